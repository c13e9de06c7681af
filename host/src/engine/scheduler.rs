//! The plugin threads: a fixed pool (one thread per core by default) that
//! runs every lane's batches, shared between tenants by weight.
//!
//! A lane owns no thread: it hands each batch's work to the pool and awaits
//! it. A worker so runs a thousand pipelines on as many threads as it has
//! cores, and a plugin that loops holds one thread for at most its budget.
//!
//! Which waiting job runs next is weighted fair queuing between *parties*
//! (a tenant, or a pipeline that has none): a party's virtual time advances
//! by the time its jobs held a thread, divided by its weight, and a free
//! thread takes the oldest job of the waiting party whose virtual time is
//! least. A party that was idle comes back at the pool's current virtual
//! time, so idling earns no credit. Under contention each busy party gets
//! threads in proportion to its weight, whatever its plugins do.
//!
//! A plugin that sleeps in a host call gives up its core while it sleeps
//! ([`blocking`]): the pool runs at most one job per core at a time, and
//! starts a spare thread (up to [`MAX_SPARE`]) when every thread is taken,
//! so a sleeper holds a thread, not a core. Its party is still charged for
//! the time its job held the thread, sleep included: a tenant that sleeps
//! gets its turns later, not more of them.
//!
//! CPU time (the thread's own clock) is counted too, for usage reports.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The environment variable that sets how many plugin threads a worker
/// runs (default: the cores available).
pub const THREADS_VAR: &str = "WEIR_PLUGIN_THREADS";

/// Threads the pool may start beyond one per core, to run jobs while
/// others sleep in host calls.
pub const MAX_SPARE: usize = 64;

thread_local! {
    /// The pool this thread belongs to, on a plugin thread.
    static POOL: std::cell::RefCell<Option<Arc<Shared>>> = const { std::cell::RefCell::new(None) };
}

/// Who a job is run for, and its share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Party {
    /// A tenant's name, or `pipeline:NAME` for a pipeline with none.
    key: Arc<str>,
    weight: u32,
}

impl Party {
    /// Tenant `name`, with its weight.
    pub fn tenant(name: &str, weight: u32) -> Self {
        Party {
            key: name.into(),
            weight: weight.max(1),
        }
    }

    /// Its share.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// A pipeline with no tenant: a party of its own, of weight 1.
    pub fn pipeline(name: &str) -> Self {
        Party {
            key: format!("pipeline:{name}").into(),
            weight: 1,
        }
    }
}

/// What a party has used of the pool so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time its jobs ran (the threads' own clocks).
    pub cpu: Duration,
    /// Time its jobs held a thread.
    pub held: Duration,
    /// Jobs run.
    pub jobs: u64,
}

/// The pool. Cheap to clone; its threads end once every clone is dropped
/// and the jobs already handed in are done.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

/// Runs the work; gives back how to hand its outcome to the caller, which
/// the thread does once the party is charged (so usage never lags what a
/// caller has seen).
type Job = Box<dyn FnOnce() -> Deliver + Send>;
type Deliver = Box<dyn FnOnce() + Send>;

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    /// Jobs running and not blocked in a host call, and the most there may
    /// be (one per core).
    running: usize,
    cores: usize,
    /// Threads started, and those waiting for a job.
    threads: usize,
    idle: usize,
    parties: Vec<PartyQueue>,
    index: HashMap<Arc<str>, usize>,
    /// Parties with jobs waiting, by (virtual time, party).
    waiting: BTreeSet<(u64, usize)>,
    /// The virtual time of the last job taken.
    now: u64,
    closing: bool,
}

struct PartyQueue {
    weight: u32,
    virtual_time: u64,
    jobs: VecDeque<Job>,
    usage: Usage,
}

/// Stops the threads when the last [`Scheduler`] goes.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        lock(&self.0.queue).closing = true;
        self.0.wake.notify_all();
    }
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // A job's panic is caught outside the lock: the queue is never left
    // half-updated, so a poisoned lock is still sound to use.
    queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Scheduler {
    /// A pool of `threads` threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                cores: threads,
                ..Queue::default()
            }),
            wake: Condvar::new(),
        });
        for _ in 0..threads {
            shared.start_thread(&mut lock(&shared.queue))?;
        }
        Ok(Scheduler {
            _owner: Arc::new(Owner(shared.clone())),
            shared,
        })
    }

    /// The default size: `WEIR_PLUGIN_THREADS`, else the cores available.
    pub fn default_threads() -> usize {
        std::env::var(THREADS_VAR)
            .ok()
            .and_then(|threads| threads.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
            .max(1)
    }

    /// Runs `work` on a plugin thread for `party`, in its fair turn. A panic
    /// in `work` is raised again here.
    pub async fn run<T: Send + 'static>(
        &self,
        party: &Party,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(work));
            Box::new(move || drop(done.send(outcome)))
        });
        self.push(party, job);
        match result.await {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            // The pool dropped the job unrun: only when the process is
            // going (the last handle is held by whoever awaits this).
            Err(_) => unreachable!("the plugin threads ended with a job waiting"),
        }
    }

    fn push(&self, party: &Party, job: Job) {
        let mut guard = lock(&self.shared.queue);
        let queue = &mut *guard;
        let id = match queue.index.get(&party.key) {
            Some(&id) => id,
            None => {
                queue.parties.push(PartyQueue {
                    weight: party.weight,
                    virtual_time: queue.now,
                    jobs: VecDeque::new(),
                    usage: Usage::default(),
                });
                queue.index.insert(party.key.clone(), queue.parties.len() - 1);
                queue.parties.len() - 1
            }
        };
        let entry = &mut queue.parties[id];
        entry.weight = party.weight;
        if entry.jobs.is_empty() {
            // Back from idle: no credit for the time it asked for nothing.
            entry.virtual_time = entry.virtual_time.max(queue.now);
            queue.waiting.insert((entry.virtual_time, id));
        }
        entry.jobs.push_back(job);
        self.shared.dispatch(queue);
    }

    /// What each party has used so far, by its key (a tenant's name, or
    /// `pipeline:NAME`).
    pub fn usage(&self) -> HashMap<String, Usage> {
        let queue = lock(&self.shared.queue);
        (queue.index.iter())
            .map(|(key, &id)| (key.to_string(), queue.parties[id].usage))
            .collect()
    }
}

impl Shared {
    /// Starts one more plugin thread.
    fn start_thread(self: &Arc<Self>, queue: &mut Queue) -> std::io::Result<()> {
        let shared = self.clone();
        std::thread::Builder::new()
            .name(format!("weir-plugin-{}", queue.threads))
            .spawn(move || shared.serve())?;
        queue.threads += 1;
        Ok(())
    }

    /// With a job waiting and a core free, wakes an idle thread to take it,
    /// or starts a spare one if none is idle (the others are blocked).
    fn dispatch(self: &Arc<Self>, queue: &mut Queue) {
        if queue.waiting.is_empty() || queue.running >= queue.cores {
            return;
        }
        if queue.idle > 0 || queue.threads >= queue.cores + MAX_SPARE || queue.closing {
            self.wake.notify_one();
        } else if let Err(err) = self.start_thread(queue) {
            tracing::warn!(%err, "Could not start a spare plugin thread");
        }
    }

    /// One plugin thread: takes the next job in fair order while fewer
    /// than one per core run, runs it, charges its party.
    fn serve(self: Arc<Self>) {
        POOL.with(|pool| *pool.borrow_mut() = Some(self.clone()));
        let mut queue = lock(&self.queue);
        loop {
            let next = (queue.running < queue.cores)
                .then(|| queue.waiting.pop_first())
                .flatten();
            let Some((virtual_time, id)) = next else {
                if queue.closing && queue.waiting.is_empty() {
                    queue.threads -= 1;
                    return;
                }
                queue.idle += 1;
                queue = self.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
                queue.idle -= 1;
                continue;
            };
            queue.running += 1;
            queue.now = queue.now.max(virtual_time);
            let party = &mut queue.parties[id];
            let job = party.jobs.pop_front().expect("a waiting party has a job");
            if !party.jobs.is_empty() {
                queue.waiting.insert((virtual_time, id));
            }
            drop(queue);

            let (started, cpu_started) = (Instant::now(), super::instance::thread_cpu_time());
            let deliver = job();
            let (held, cpu) = (
                started.elapsed(),
                super::instance::thread_cpu_time() - cpu_started,
            );

            queue = lock(&self.queue);
            queue.running -= 1;
            let party = &mut queue.parties[id];
            let was = party.virtual_time;
            party.virtual_time += (held.as_nanos() as u64) / u64::from(party.weight);
            party.usage.cpu += cpu;
            party.usage.held += held;
            party.usage.jobs += 1;
            let now = party.virtual_time;
            if queue.waiting.remove(&(was, id)) {
                queue.waiting.insert((now, id));
            }
            drop(queue);
            deliver();
            queue = lock(&self.queue);
        }
    }
}

/// While alive, the plugin thread that made it is blocked in a host call
/// (a sleep) and does not count against the pool's cores.
pub(super) struct Blocked(Option<Arc<Shared>>);

/// Marks the calling thread blocked until the guard drops, if it is a
/// plugin thread: another job may run on its core meanwhile (on an idle
/// thread, or a spare one started for it).
pub(super) fn blocking() -> Blocked {
    let Some(shared) = POOL.with(|pool| pool.borrow().clone()) else {
        return Blocked(None);
    };
    let mut queue = lock(&shared.queue);
    queue.running -= 1;
    shared.dispatch(&mut queue);
    drop(queue);
    Blocked(Some(shared))
}

impl Drop for Blocked {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            // Back on its core; for a moment there may be one job more
            // running than cores, until one ends.
            lock(&shared.queue).running += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_and_their_results_and_usage_come_back() {
        let pool = Scheduler::new(2).unwrap();
        let party = Party::tenant("a", 1);
        for n in 0..20u64 {
            assert_eq!(pool.run(&party, move || n * 2).await, n * 2);
        }
        assert_eq!(pool.usage()["a"].jobs, 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_a_job_reaches_its_caller_and_the_pool_goes_on() {
        let pool = Scheduler::new(1).unwrap();
        let party = Party::pipeline("p");
        let pool2 = pool.clone();
        let party2 = party.clone();
        let panicked = tokio::spawn(async move {
            pool2.run(&party2, || panic!("boom")).await;
        })
        .await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(pool.run(&party, || 7).await, 7);
    }

    /// With one thread, a party of weight 3 and one of weight 1 each with
    /// jobs queued: the pick order follows the weights (counted in jobs,
    /// each holding the thread the same time), not arrival.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_thread_is_shared_by_weight() {
        let pool = Scheduler::new(1).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        // Holds the only thread while both parties queue their jobs.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let blocker = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(&Party::tenant("gate", 1), move || gate.recv().unwrap())
                    .await
            })
        };
        while pool.usage().is_empty() {
            tokio::task::yield_now().await;
        }
        let mut runs = Vec::new();
        for (name, weight) in [("light", 1), ("heavy", 3)] {
            for _ in 0..12 {
                let (pool, order) = (pool.clone(), order.clone());
                runs.push(tokio::spawn(async move {
                    pool.run(&Party::tenant(name, weight), move || {
                        std::thread::sleep(Duration::from_millis(2));
                        order.lock().unwrap().push(name);
                    })
                    .await
                }));
            }
        }
        while pool.usage().len() < 3 || queued(&pool) < 24 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        blocker.await.unwrap();
        for run in runs {
            run.await.unwrap();
        }
        let order = order.lock().unwrap();
        // In the first 16 picks, about 3 of every 4 are the heavy party's
        // (each job holds the thread about as long; a sleep that overshoots
        // on a loaded machine moves it by one or two, not to arrival order,
        // which would give 4 of 16).
        let heavy = order[..16].iter().filter(|name| **name == "heavy").count();
        assert!((10..=14).contains(&heavy), "heavy took {heavy} of the first 16: {order:?}");
    }

    /// One core: a job blocked in a host call gives its core to the next
    /// job (here the one it waits for), on a spare thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_blocked_in_a_host_call_gives_up_its_core() {
        let pool = Scheduler::new(1).unwrap();
        let (tell, told) = std::sync::mpsc::channel::<()>();
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let (pool, started) = (pool.clone(), started.clone());
            tokio::spawn(async move {
                pool.run(&Party::tenant("a", 1), move || {
                    let _blocked = blocking();
                    started.store(true, std::sync::atomic::Ordering::Release);
                    told.recv_timeout(Duration::from_secs(60)).is_ok()
                })
                .await
            })
        };
        // The only core's job is blocked before the second is handed in.
        while !started.load(std::sync::atomic::Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        pool.run(&Party::tenant("b", 1), move || tell.send(()).unwrap())
            .await;
        assert!(waiter.await.unwrap(), "the second job never ran beside the blocked one");
    }

    fn queued(pool: &Scheduler) -> usize {
        let queue = lock(&pool.shared.queue);
        queue.parties.iter().map(|party| party.jobs.len()).sum()
    }
}
