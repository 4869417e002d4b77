//! What changed between two route sets, so that an edge that has one is
//! sent the difference rather than the whole (issue 13: at 10,000 apps a
//! route document is 7 MB, and reading it costs an edge ~30 ms per change).
//!
//! A delta names the version it applies to (`base`) and the version it
//! makes; [`EdgeDelta::apply`] on the routes of `base` gives exactly the
//! routes [`EdgeDelta::between`] was computed to, backend order included.
//! An agent computes routes whose unchanged backends are the previous
//! view's (`Arc<Backend>`), so telling them apart is a pointer comparison
//! for nearly all of them.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::routes::{Backend, HttpRoute, Problem, Routes};

/// `GET /v1/edge?...&base=V` when the agent still knows version `V`: the
/// routes of `version` as a change to those of `base`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeDelta {
    pub version: u64,
    pub base: u64,
    /// Backends new or changed since `base`, whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<Arc<Backend>>,
    /// Names of the backends gone since `base`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<Arc<str>>,
    /// Every backend's name in order, when patching in place (changed ones
    /// where they were, new ones at the end) would not give the new order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Vec<Arc<str>>>,
    /// The HTTP routes, when they changed (whole: they are an ordered list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_routes: Option<Vec<HttpRoute>>,
    /// The problems, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<Problem>>,
}

impl EdgeDelta {
    /// The change from `old` (version `base`) to `new` (version `version`).
    pub fn between(old: &Routes, base: u64, new: &Routes, version: u64) -> EdgeDelta {
        let before: HashMap<&str, &Arc<Backend>> =
            old.backends.iter().map(|b| (&*b.name, b)).collect();
        let mut upsert = Vec::new();
        for b in &new.backends {
            match before.get(&*b.name) {
                Some(o) if Arc::ptr_eq(o, b) || ***o == **b => {}
                _ => upsert.push(b.clone()),
            }
        }
        let after: HashMap<&str, ()> = new.backends.iter().map(|b| (&*b.name, ())).collect();
        let remove: Vec<Arc<str>> = old
            .backends
            .iter()
            .filter(|b| !after.contains_key(&*b.name))
            .map(|b| Arc::from(&*b.name))
            .collect();
        let mut delta = EdgeDelta {
            version,
            base,
            upsert,
            remove,
            order: None,
            http_routes: (old.http_routes != new.http_routes).then(|| new.http_routes.clone()),
            problems: (old.problems != new.problems).then(|| new.problems.clone()),
        };
        // The order patching gives, compared with the new one.
        let patched = delta.patched_order(old);
        if !patched
            .iter()
            .map(|n| &**n)
            .eq(new.backends.iter().map(|b| &*b.name))
        {
            delta.order = Some(new.backends.iter().map(|b| Arc::from(&*b.name)).collect());
        }
        delta
    }

    /// Backend names in the order [`EdgeDelta::apply`] leaves them without
    /// an explicit `order`: `old`'s, less the removed, then the new ones.
    fn patched_order<'a>(&'a self, old: &'a Routes) -> Vec<&'a str> {
        let removed: HashMap<&str, ()> = self.remove.iter().map(|n| (&**n, ())).collect();
        let known: HashMap<&str, ()> = old.backends.iter().map(|b| (&*b.name, ())).collect();
        old.backends
            .iter()
            .map(|b| &*b.name)
            .filter(|n| !removed.contains_key(n))
            .chain(
                self.upsert
                    .iter()
                    .map(|b| &*b.name)
                    .filter(|n| !known.contains_key(n)),
            )
            .collect()
    }

    /// The routes of `version`, from `old` (the routes of `base`).
    /// Unchanged backends are `old`'s (shared, not copied). Fails when the
    /// delta does not fit `old` (an order naming a backend neither has).
    pub fn apply(self, old: &Routes) -> Result<Routes, String> {
        let order: Vec<Arc<str>> = match &self.order {
            Some(o) => o.clone(),
            None => self.patched_order(old).into_iter().map(Arc::from).collect(),
        };
        let mut by_name: HashMap<&str, &Arc<Backend>> =
            old.backends.iter().map(|b| (&*b.name, b)).collect();
        for n in &self.remove {
            by_name.remove(&**n);
        }
        for b in &self.upsert {
            by_name.insert(&*b.name, b);
        }
        let backends = order
            .iter()
            .map(|n| {
                by_name
                    .get(&**n)
                    .map(|b| Arc::clone(b))
                    .ok_or_else(|| format!("the delta orders {n}, which no route set has"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if backends.len() != by_name.len() {
            return Err(format!(
                "the delta leaves {} backends but orders {}",
                by_name.len(),
                backends.len()
            ));
        }
        Ok(Routes {
            backends,
            http_routes: self.http_routes.unwrap_or_else(|| old.http_routes.clone()),
            problems: self.problems.unwrap_or_else(|| old.problems.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{Mode, PortLabels};
    use crate::routes::{Server, ServerState};
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn backend(name: &str, servers: u8, up: bool) -> Arc<Backend> {
        let labels = PortLabels {
            groups: vec!["external".into()],
            mode: Mode::Http,
            vhosts: vec![format!("{name}.example.com").into()],
            ..Default::default()
        };
        Arc::new(Backend {
            name: name.into(),
            app: format!("/{name}").into(),
            port_index: 0,
            service_port: Some(10000),
            bind_port: None,
            labels: Arc::new(labels),
            servers: (0..servers)
                .map(|i| Server {
                    addr: SocketAddr::from(([10, 0, 0, i], 80)),
                    node: "n1".into(),
                    state: if up {
                        ServerState::Up
                    } else {
                        ServerState::Unhealthy
                    },
                })
                .collect(),
        })
    }

    fn route(host: &str, backend: &str) -> HttpRoute {
        HttpRoute {
            host: Some(host.into()),
            path: None,
            backend: backend.into(),
        }
    }

    /// A route set drawn as (name index, servers, up) per backend, in order.
    fn routes_of(
        draw: &[(u8, u8, bool)],
        shared: &HashMap<(u8, u8, bool), Arc<Backend>>,
    ) -> Routes {
        let mut seen = std::collections::BTreeSet::new();
        let backends: Vec<Arc<Backend>> = draw
            .iter()
            .filter(|d| seen.insert(d.0))
            .map(|d| shared[d].clone())
            .collect();
        Routes {
            http_routes: backends
                .iter()
                .map(|b| route(&format!("{}.example.com", b.name), &b.name))
                .collect(),
            backends,
            problems: Vec::new(),
        }
    }

    proptest! {
        /// Applying the delta between two route sets to the first gives the
        /// second exactly (order included), and only what changed is sent.
        #[test]
        fn a_delta_applied_gives_the_new_routes(
            a in prop::collection::vec((0u8..12, 0u8..3, any::<bool>()), 0..12),
            b in prop::collection::vec((0u8..12, 0u8..3, any::<bool>()), 0..12),
        ) {
            // Equal draws share one Arc, as an agent's views do.
            let mut shared = HashMap::new();
            for d in a.iter().chain(&b) {
                shared.entry(*d).or_insert_with(|| backend(&format!("b{}", d.0), d.1, d.2));
            }
            let (old, new) = (routes_of(&a, &shared), routes_of(&b, &shared));
            let delta = EdgeDelta::between(&old, 1, &new, 2);
            for u in &delta.upsert {
                let before = old.backends.iter().find(|o| o.name == u.name);
                prop_assert!(before.is_none_or(|o| **o != **u), "{} sent unchanged", u.name);
            }
            // Through JSON, as an edge receives it.
            let json = serde_json::to_vec(&delta).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let read: EdgeDelta = serde_json::from_slice(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&read, &delta);
            prop_assert_eq!(read.apply(&old), Ok(new));
        }
    }

    #[test]
    fn an_unchanged_route_set_is_an_empty_delta() {
        let b = backend("web", 2, true);
        let routes = Routes {
            backends: vec![b.clone()],
            http_routes: vec![route("web.example.com", "web")],
            problems: Vec::new(),
        };
        let delta = EdgeDelta::between(&routes, 7, &routes.clone(), 7);
        assert!(delta.upsert.is_empty() && delta.remove.is_empty());
        assert_eq!(
            (delta.order.as_ref(), delta.http_routes.as_ref()),
            (None, None)
        );
        assert_eq!(
            serde_json::to_string(&delta).ok().as_deref(),
            Some(r#"{"version":7,"base":7}"#)
        );
    }

    #[test]
    fn a_delta_that_does_not_fit_is_refused() {
        let old = Routes::default();
        let delta = EdgeDelta {
            version: 2,
            base: 1,
            upsert: Vec::new(),
            remove: Vec::new(),
            order: Some(vec!["ghost".into()]),
            http_routes: None,
            problems: None,
        };
        assert!(delta.apply(&old).is_err());
    }
}
