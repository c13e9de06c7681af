//! Routes JSON records to named outputs by the value of a top-level field.
//! Each sink of the pipeline lists the routes it takes.
//!
//! ```toml
//! [[pipeline.plugin]]
//! crate = "plugins/router"
//! config = { field = "country", routes = { DE = "eu", FR = "eu", US = "us" }, otherwise = "rest" }
//! ```
//!
//! A record whose value has no route goes to `otherwise`, or stays on the
//! default route when `otherwise` is unset. A record that is not a JSON
//! object fails with the reason.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use weir_guest::{Error, Output, RecordView, Result, Transform, export_transform};

/// The plugin's settings.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Router {
    /// The top-level field whose value picks the route.
    field: String,
    /// Field value (strings as they are; numbers and booleans as written) to route name.
    routes: HashMap<String, String>,
    /// The route of records whose value is not listed.
    otherwise: Option<String>,
}

impl Transform for Router {
    fn validate(&mut self) -> Result<()> {
        if self.routes.is_empty() {
            return Err(Error::new(
                "`routes` is empty: every record would take one route",
            ));
        }
        if let Some((value, _)) = self.routes.iter().find(|(_, route)| route.is_empty()) {
            return Err(Error::new(format!(
                "the route for `{value}` is an empty name"
            )));
        }
        Ok(())
    }

    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        let doc: HashMap<std::borrow::Cow<'_, str>, &RawValue> =
            serde_json::from_slice(record.value())
                .map_err(|err| Error::new(format!("not a JSON object: {err}")))?;
        let value = doc.get(self.field.as_str()).map(|raw| {
            // A string matches without its quotes; anything else as written.
            serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned())
        });
        let route = value
            .and_then(|v| self.routes.get(&v))
            .or(self.otherwise.as_ref());
        match route {
            Some(route) => out.forward_to(&record, route),
            None => out.forward(&record),
        }
        Ok(())
    }
}

export_transform!(Router);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_guest::testing::{TestRecord, configure, run};

    #[test]
    fn routes_by_value_with_a_fallback() {
        let mut plugin: Router =
            configure(r#"{"field": "country", "routes": {"DE": "eu", "FR": "eu", "US": "us", "1": "one"}, "otherwise": "rest"}"#)
                .unwrap();
        let input = [
            r#"{"country":"DE"}"#,
            r#"{"country":"US"}"#,
            r#"{"country":"JP"}"#,
            r#"{"other":1}"#,
            r#"{"country":1}"#,
        ];
        let outcomes = run(&mut plugin, &input.map(TestRecord::new));
        let routes: Vec<Option<&str>> = outcomes
            .iter()
            .map(|o| o.outputs()[0].route.as_deref())
            .collect();
        assert_eq!(
            routes,
            [
                Some("eu"),
                Some("us"),
                Some("rest"),
                Some("rest"),
                Some("one")
            ]
        );
        assert_eq!(
            outcomes[0].outputs()[0].value_str(),
            input[0],
            "routing leaves the record as it was"
        );
    }

    #[test]
    fn without_otherwise_unlisted_values_keep_the_default_route() {
        let mut plugin: Router =
            configure(r#"{"field": "level", "routes": {"ERROR": "alerts"}}"#).unwrap();
        let outcomes = run(&mut plugin, &[TestRecord::new(r#"{"level":"INFO"}"#)]);
        assert_eq!(outcomes[0].outputs()[0].route, None);
    }

    #[test]
    fn fails_non_objects_and_refuses_empty_routes() {
        let mut plugin: Router =
            configure(r#"{"field": "level", "routes": {"ERROR": "alerts"}}"#).unwrap();
        assert!(
            run(&mut plugin, &[TestRecord::new("[]")])[0]
                .failure()
                .is_some()
        );
        let err = configure::<Router>(r#"{"field": "level", "routes": {}}"#)
            .err()
            .unwrap();
        assert!(err.contains("`routes` is empty"), "{err}");
    }
}
