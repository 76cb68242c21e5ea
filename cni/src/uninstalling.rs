//! Whether a stop is an uninstall: a SIGTERM comes both when the mesh is
//! being removed (its DaemonSet deleted) and when the DaemonSet is merely
//! rolled (upgrade, restart, node drain), when the next pod takes over.
//! Only the first may take what the DaemonSet put on the node away (the
//! CNI plugin, [`crate::install`]; the node's probe tables,
//! [`crate::host`]): in every other case the gap until the next pod would
//! start pods without the mesh, or fail the kubelet's probes.
//!
//! The rule fails safe: only an answer that the DaemonSet is gone or being
//! deleted (or that the mesh's role is: a Kubernetes 403 Forbidden) is an
//! uninstall. For the node agent's tables a 401 (a bound token is refused
//! after a force-deleted pod object, a recreated ServiceAccount or a
//! rotated signing key) keeps them; install-cni takes a Kubernetes 401 as
//! the ServiceAccount gone in an uninstall (`kubectl delete -k` deletes it
//! before the DaemonSet), since a plugin left chained with a dead token
//! would fail every new pod on the node. A 403 or 401 not from Kubernetes,
//! no answer, a slow one, an unreadable one, or no way to ask keeps
//! everything in place. The node agent also records its
//! DaemonSet's UID at start ([`observe`], [`Seen`]): one missing at stop
//! that was not there then, or one of another UID, keeps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;

/// What a stop should do, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Uninstall(String),
    Keep(String),
}

/// What the agent saw of its DaemonSet when it started: a DaemonSet
/// missing at stop counts as gone only if it was there then, and one with
/// another UID is not ours (a renamed DaemonSet, a kustomize `namePrefix`,
/// or one deleted and recreated, make the name alone no answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Not asked (install-cni): the name alone decides.
    NotAsked,
    /// Asked at start with no answer: a missing DaemonSet keeps.
    Unknown,
    /// Not there at start: not ours, whatever happens to it.
    Absent,
    /// There at start, with this UID (empty when it had none: the lab's).
    Uid(String),
}

/// Where to ask whether our DaemonSet is going.
#[derive(Debug, Clone, Default)]
pub enum Check {
    /// Nowhere: a stop keeps everything.
    #[default]
    None,
    /// The API server (in-cluster credentials).
    Kube {
        namespace: String,
        daemonset: String,
    },
    /// A directory of objects (the lab's stand-in for the API server): the
    /// DaemonSet is the file `daemonset-<namespace>-<name>.yaml` in it.
    Dir {
        dir: PathBuf,
        namespace: String,
        daemonset: String,
    },
}

/// How long the API server has to answer.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks where `check` says, against what start saw.
pub async fn decide_by(check: &Check, seen: &Seen) -> Decision {
    match check {
        Check::None => Decision::Keep("no DaemonSet to ask about was configured".into()),
        Check::Kube {
            namespace,
            daemonset,
        } => match kube::Client::try_default().await {
            Ok(client) => decide_seen(Some(&client), namespace, daemonset, API_TIMEOUT, seen).await,
            Err(e) => Decision::Keep(format!(
                "no API client ({e}), so an uninstall cannot be told from a restart"
            )),
        },
        Check::Dir {
            dir,
            namespace,
            daemonset,
        } => decide_in_dir(dir, namespace, daemonset, seen),
    }
}

/// What the DaemonSet `check` names is at start.
pub async fn observe(check: &Check) -> Seen {
    match check {
        Check::None => Seen::Unknown,
        Check::Kube {
            namespace,
            daemonset,
        } => {
            let Ok(client) = kube::Client::try_default().await else {
                return Seen::Unknown;
            };
            let dss: kube::Api<DaemonSet> = kube::Api::namespaced(client, namespace);
            match tokio::time::timeout(API_TIMEOUT, dss.get_opt(daemonset)).await {
                Ok(Ok(Some(ds))) => Seen::Uid(ds.metadata.uid.unwrap_or_default()),
                Ok(Ok(None)) => Seen::Absent,
                _ => Seen::Unknown,
            }
        }
        Check::Dir {
            dir,
            namespace,
            daemonset,
        } => match read_dir_object(dir, namespace, daemonset) {
            Ok(None) => Seen::Absent,
            Ok(Some((uid, _))) => Seen::Uid(uid),
            Err(_) => Seen::Unknown,
        },
    }
}

/// The decision on what the DaemonSet `what` is now (`found`: its UID and
/// whether it is being deleted; None: gone) against what start saw.
fn judge(what: &str, found: Option<(String, bool)>, seen: &Seen) -> Decision {
    match (found, seen) {
        (None, Seen::NotAsked | Seen::Uid(_)) => Decision::Uninstall(format!("{what} is gone")),
        (None, _) => Decision::Keep(format!(
            "{what} is missing, but was not seen when this agent started (a DaemonSet of another name?)"
        )),
        (Some((uid, _)), Seen::Uid(at_start)) if uid != *at_start => Decision::Keep(format!(
            "{what} is not the one this agent started under (UID {uid}, was {at_start})"
        )),
        (Some(_), Seen::Absent) => Decision::Keep(format!(
            "{what} was not there when this agent started: not ours"
        )),
        (Some((_, true)), _) => Decision::Uninstall(format!("{what} is being deleted")),
        (Some(_), _) => Decision::Keep(format!(
            "{what} still exists (a rolling upgrade or a restart)"
        )),
    }
}

/// Why the lab's DaemonSet object could not be read (a stop then keeps).
#[derive(Debug, thiserror::Error)]
enum DirObjectError {
    #[error("reading {path} failed: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} cannot be parsed: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

/// The lab's DaemonSet object: None when its file is gone, else its UID
/// (empty without one) and whether it is being deleted.
fn read_dir_object(
    dir: &Path,
    namespace: &str,
    daemonset: &str,
) -> Result<Option<(String, bool)>, DirObjectError> {
    let path = dir.join(format!("daemonset-{namespace}-{daemonset}.yaml"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(DirObjectError::Read { path, source }),
    };
    let v = serde_yaml::from_str::<serde_yaml::Value>(&text)
        .map_err(|source| DirObjectError::Parse { path, source })?;
    let uid = v["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok(Some((uid, !v["metadata"]["deletionTimestamp"].is_null())))
}

/// The lab's answer: the DaemonSet's object file gone, or with a
/// `metadata.deletionTimestamp`, is an uninstall (as [`judge`] rules with
/// what start saw); a file that cannot be read or parsed keeps.
pub fn decide_in_dir(dir: &Path, namespace: &str, daemonset: &str, seen: &Seen) -> Decision {
    let what = format!("DaemonSet {namespace}/{daemonset} (in {})", dir.display());
    match read_dir_object(dir, namespace, daemonset) {
        Ok(found) => judge(&what, found, seen),
        Err(e) => Decision::Keep(e.to_string()),
    }
}

/// Asks the API server whether our DaemonSet is gone or being deleted.
/// Anything short of that answer, including no answer, keeps.
pub async fn decide(
    api: Option<&kube::Client>,
    namespace: &str,
    daemonset: &str,
    timeout: Duration,
) -> Decision {
    decide_seen(api, namespace, daemonset, timeout, &Seen::NotAsked).await
}

/// [`decide`] against what start saw of the DaemonSet.
pub async fn decide_seen(
    api: Option<&kube::Client>,
    namespace: &str,
    daemonset: &str,
    timeout: Duration,
    seen: &Seen,
) -> Decision {
    let Some(client) = api else {
        return Decision::Keep(
            "no API client, so an uninstall cannot be told from a restart".into(),
        );
    };
    let dss: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), namespace);
    let what = format!("DaemonSet {namespace}/{daemonset}");
    match tokio::time::timeout(timeout, dss.get_opt(daemonset)).await {
        Err(_) => Decision::Keep(format!(
            "the API server did not answer about {what} within {timeout:?}"
        )),
        Ok(answer) => of_answer(&what, answer, seen),
    }
}

/// What the API server's answer about the DaemonSet `what` means.
fn of_answer(what: &str, answer: Result<Option<DaemonSet>, kube::Error>, seen: &Seen) -> Decision {
    match answer {
        // Our role is gone (RBAC refused, as a Kubernetes Status): an
        // uninstall deletes it, an upgrade leaves it, and a plugin left
        // behind without it would fail every new pod on the node. A 401 is
        // no such answer (a bound token is refused as soon as its pod
        // object is force-deleted, its Node re-registered, its
        // ServiceAccount recreated or the signing key rotated), nor is a
        // 403 that is not Kubernetes' own (a proxy's): both keep.
        Err(kube::Error::Api(s)) if s.code == 403 && s.reason == "Forbidden" => {
            Decision::Uninstall(format!(
                "the API server refused to say (403 Forbidden: {}): the mesh's role is gone",
                s.message
            ))
        }
        // install-cni (which records nothing at start) still takes a
        // Kubernetes 401 as an uninstall: `kubectl delete -k` or deleting
        // the namespace removes the ServiceAccount before the DaemonSet, so
        // a real uninstall's pods see their token refused, and a plugin left
        // chained with that dead token would fail every new pod on the node
        // for good. A force-deleted pod object also gets a 401; then the
        // plugin is unchained until the next pod chains it again (pods
        // started in that gap are captured by the node agent's reconcile).
        // The node agent's tables are never taken away on a 401.
        Err(kube::Error::Api(s))
            if s.code == 401 && s.reason == "Unauthorized" && *seen == Seen::NotAsked =>
        {
            Decision::Uninstall(format!(
                "the API server refused the mesh's token (401 Unauthorized: {}): its ServiceAccount is gone",
                s.message
            ))
        }
        Err(e) => Decision::Keep(format!("reading {what} failed: {e}")),
        Ok(found) => judge(
            what,
            found.map(|ds| {
                let deleting = ds.metadata.deletion_timestamp.is_some();
                (ds.metadata.uid.unwrap_or_default(), deleting)
            }),
            seen,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab's DaemonSet object: present keeps (a restart), gone or
    /// being deleted uninstalls, unreadable keeps.
    #[test]
    fn the_lab_daemonset_file_decides_like_the_api_server() {
        let dir = tempfile::tempdir().unwrap();
        let d = || {
            decide_in_dir(
                dir.path(),
                "istio-system",
                "ztunnel",
                &Seen::Uid(String::new()),
            )
        };
        assert!(matches!(d(), Decision::Uninstall(_)), "{:?}", d());
        let path = dir.path().join("daemonset-istio-system-ztunnel.yaml");
        let obj = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: ztunnel, namespace: istio-system}\n";
        std::fs::write(&path, obj).unwrap();
        assert!(matches!(d(), Decision::Keep(_)), "{:?}", d());
        let deleting = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: ztunnel\n  namespace: istio-system\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n";
        std::fs::write(&path, deleting).unwrap();
        assert!(matches!(d(), Decision::Uninstall(_)), "{:?}", d());
        std::fs::write(&path, "metadata: [unclosed").unwrap();
        assert!(matches!(d(), Decision::Keep(_)), "{:?}", d());
    }

    fn refused(code: u16, body: &str) -> kube::Error {
        // As kube's client builds it: a Kubernetes Status parsed from the
        // body, or one made up around a body that is not one.
        let status = serde_json::from_str::<kube::core::Status>(body).unwrap_or_else(|_| {
            kube::core::Status::failure(body, "Failed to parse error data").with_code(code)
        });
        kube::Error::Api(status.boxed())
    }

    /// A 401 is no uninstall: a bound token is refused as soon as its pod
    /// object is force-deleted, its Node re-registered, its ServiceAccount
    /// recreated or the signing key rotated. A 403 is one only as a
    /// Kubernetes Status with reason Forbidden (the role is gone); a 403 or
    /// 401 from anything else (a proxy in front of the API server) keeps.
    #[test]
    fn only_a_kubernetes_forbidden_is_an_uninstall() {
        let what = "DaemonSet istio-system/ztunnel";
        let k8s = |code: u16, reason: &str| {
            format!(
                r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":"m","reason":"{reason}","code":{code}}}"#
            )
        };
        let d = |code, body: &str| of_answer(what, Err(refused(code, body)), &Seen::NotAsked);
        let forbidden = d(403, &k8s(403, "Forbidden"));
        assert!(matches!(forbidden, Decision::Uninstall(_)), "{forbidden:?}");
        // install-cni (not asked at start): a Kubernetes 401 is the
        // ServiceAccount gone before the DaemonSet (`kubectl delete -k`).
        let unauthorized = d(401, &k8s(401, "Unauthorized"));
        assert!(
            matches!(unauthorized, Decision::Uninstall(_)),
            "{unauthorized:?}"
        );
        // The node agent (its DaemonSet seen at start): a 401 keeps.
        let agent = of_answer(
            what,
            Err(refused(401, &k8s(401, "Unauthorized"))),
            &Seen::Uid("a".into()),
        );
        assert!(matches!(agent, Decision::Keep(_)), "{agent:?}");
        for (code, body) in [
            (401, "Unauthorized".to_string()),
            (403, "<html>403 Forbidden</html>".to_string()),
            (403, r#"{"error":"forbidden"}"#.to_string()),
            (403, k8s(403, "")),
        ] {
            let got = d(code, &body);
            assert!(matches!(got, Decision::Keep(_)), "{code} {body}: {got:?}");
        }
        assert!(matches!(
            of_answer(what, Ok(None), &Seen::NotAsked),
            Decision::Uninstall(_)
        ));
    }

    /// The name alone is no answer: a DaemonSet missing at stop that was
    /// not there at start (a kustomize prefix renamed ours) keeps, and one
    /// with another UID than at start is not ours.
    #[test]
    fn only_the_daemonset_seen_at_start_decides() {
        let w = "DaemonSet istio-system/ztunnel";
        let uid = |u: &str| Seen::Uid(u.into());
        let keep = |d: Decision| matches!(d, Decision::Keep(_));
        assert!(keep(judge(w, None, &Seen::Absent)));
        assert!(keep(judge(w, None, &Seen::Unknown)));
        assert!(!keep(judge(w, None, &uid("a"))));
        assert!(keep(judge(w, Some(("b".into(), true)), &uid("a"))));
        assert!(keep(judge(w, Some(("b".into(), true)), &Seen::Absent)));
        assert!(!keep(judge(w, Some(("a".into(), true)), &uid("a"))));
        assert!(keep(judge(w, Some(("a".into(), false)), &uid("a"))));
        assert!(
            !keep(judge(w, None, &Seen::NotAsked)),
            "install-cni: as before"
        );
    }
}
