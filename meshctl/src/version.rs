//! `meshctl version`: this client's version, the control plane's and each
//! proxy's (every ztunnel by node, every waypoint replica), with a warning
//! when they differ.

use serde::Serialize;

use crate::output::Table;
use crate::source::{Endpoint, Mesh};

/// meshctl's own version.
pub const CLIENT: &str = env!("CARGO_PKG_VERSION");

/// One component's version, or why it is not known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Component {
    /// "client", "control plane", "ztunnel" or "waypoint".
    pub component: String,
    /// The node (ztunnels), the replica (waypoints) or the program.
    pub name: String,
    /// None when it did not answer or did not say.
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

async fn ask(component: &str, name: &str, ep: &Endpoint, path: &str) -> Component {
    let (version, error) = match ep.get_json(path).await {
        Ok(v) => match v["version"].as_str() {
            Some(s) => (Some(s.to_string()), None),
            None => (None, Some(format!("GET {path} names no version (older?)"))),
        },
        Err(e) => (
            None,
            Some(e.to_string().lines().next().unwrap_or_default().to_string()),
        ),
    };
    Component {
        component: component.into(),
        name: name.into(),
        version,
        error,
    }
}

/// Every component's version.
pub async fn collect(mesh: &Mesh) -> Vec<Component> {
    let mut out = vec![Component {
        component: "client".into(),
        name: "meshctl".into(),
        version: Some(CLIENT.into()),
        error: None,
    }];
    if let Some(c) = &mesh.controller {
        out.push(ask("control plane", "istiod-lite", c, "/version").await);
    }
    if let Some(f) = &mesh.file {
        out.push(Component {
            component: "ztunnel".into(),
            name: f["node"].as_str().unwrap_or("-").into(),
            version: f["version"].as_str().map(str::to_string),
            error: None,
        });
    }
    for z in &mesh.ztunnels {
        out.push(ask("ztunnel", &z.node, &z.admin, "/config_dump").await);
    }
    for w in &mesh.waypoints {
        out.push(ask("waypoint", &w.name, &w.admin, "/config_dump").await);
    }
    out
}

/// The warnings: components on another version than the client's, and
/// components whose version is unknown.
pub fn skew(components: &[Component]) -> Vec<String> {
    let mut w = Vec::new();
    for c in components {
        match (&c.version, &c.error) {
            (Some(v), _) if v != CLIENT => w.push(format!(
                "warning: version skew: {} {} runs {v}, meshctl is {CLIENT}",
                c.component, c.name
            )),
            (None, e) => w.push(format!(
                "warning: {} {}: version unknown{}",
                c.component,
                c.name,
                e.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
            )),
            _ => {}
        }
    }
    w
}

pub fn table(components: &[Component]) -> Table {
    let mut t = Table::new("components", &["COMPONENT", "NAME", "VERSION"]);
    for c in components {
        t.push_item(
            vec![
                c.component.clone(),
                c.name.clone(),
                c.version.clone().unwrap_or_else(|| "unknown".into()),
            ],
            serde_json::to_value(c).unwrap_or_default(),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(component: &str, name: &str, v: Option<&str>) -> Component {
        Component {
            component: component.into(),
            name: name.into(),
            version: v.map(str::to_string),
            error: None,
        }
    }

    #[test]
    fn skew_and_unknown_versions_are_warned() {
        let all = vec![
            c("client", "meshctl", Some(CLIENT)),
            c("ztunnel", "node-1", Some(CLIENT)),
            c("ztunnel", "node-2", Some("0.0.1-old")),
            c("control plane", "istiod-lite", None),
        ];
        let w = skew(&all);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("node-2 runs 0.0.1-old"), "{w:?}");
        assert!(w[1].contains("istiod-lite: version unknown"), "{w:?}");
        assert!(skew(&all[..2]).is_empty());
        let t = table(&all);
        assert_eq!(t.rows[3][2], "unknown");
        assert!(t.items[3]["version"].is_null());
    }
}
