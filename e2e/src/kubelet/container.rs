//! From a pod's containers to what the runtime starts: the argv (the
//! image's mapping), the environment (as the kubelet makes it: the
//! API server's address, `fieldRef` values, `$(VAR)` expansion) and the
//! mounts (the image's programs, the volumes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::apiserver::{SERVICE_IP, SERVICE_PORT};
use super::images;
use super::runtime::Mount;
use super::volumes::field;

/// A readiness probe the lab runs: HTTP GET `path` on the pod's `port`.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    pub port: u16,
    pub path: String,
}

/// One container, ready to start.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub probe: Option<HttpProbe>,
}

/// `$(NAME)` replaced by earlier values; `$$(NAME)` is a literal.
fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("$(") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("$(");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                let name = &after[..j];
                match vars.iter().rev().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => out.push_str(&format!("$({name})")),
                }
                rest = &after[j + 1..];
            }
            None => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn env(pod: &Pod, c: &Container, ip: &str, host_ip: &str) -> Vec<(String, String)> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut vars: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOSTNAME".into(), name),
        ("KUBERNETES_SERVICE_HOST".into(), SERVICE_IP.into()),
        ("KUBERNETES_SERVICE_PORT".into(), SERVICE_PORT.to_string()),
    ];
    for e in c.env.as_deref().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => expand(v, &vars),
            (None, Some(from)) => match &from.field_ref {
                Some(f) if f.field_path == "status.podIP" => ip.to_string(),
                Some(f) if f.field_path == "status.hostIP" => host_ip.to_string(),
                Some(f) => field(pod, &f.field_path).unwrap_or_default(),
                None => String::new(),
            },
            (None, None) => String::new(),
        };
        vars.push((e.name.clone(), value));
    }
    vars
}

fn probe(c: &Container) -> Option<HttpProbe> {
    let get = c.readiness_probe.as_ref()?.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(p) => u16::try_from(*p).ok()?,
        IntOrString::String(name) => c
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())?,
    };
    Some(HttpProbe {
        port,
        path: get.path.clone().unwrap_or_else(|| "/".into()),
    })
}

/// Every container of the pod to start, native sidecars (init containers
/// with `restartPolicy: Always`) first; or why it cannot run.
pub fn containers(
    pod: &Pod,
    volumes: &BTreeMap<String, PathBuf>,
    images_root: &Path,
    ip: &str,
    host_ip: &str,
) -> Result<Vec<ContainerSpec>, String> {
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let sidecars = spec
        .init_containers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let mut out = Vec::new();
    for c in sidecars.chain(spec.containers.iter()) {
        let image_ref = c.image.clone().unwrap_or_default();
        let image = images::lookup(&image_ref)
            .ok_or_else(|| format!("ErrImagePull: the lab has no programs for image {image_ref:?} (e2e/src/kubelet/images.rs)"))?;
        let bin = images::image_dir(images_root, image).map_err(|e| e.to_string())?;
        let mut mounts = vec![Mount {
            source: bin,
            target: "/usr/local/bin".into(),
        }];
        for m in c.volume_mounts.as_deref().unwrap_or_default() {
            let source = volumes
                .get(&m.name)
                .ok_or_else(|| format!("container {}: no volume {}", c.name, m.name))?;
            let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => source.join(sub),
                None => source.clone(),
            };
            mounts.push(Mount {
                source,
                target: m.mount_path.clone(),
            });
        }
        let env = env(pod, c, ip, host_ip);
        let expand_all = |v: &Option<Vec<String>>| -> Option<Vec<String>> {
            v.as_ref()
                .map(|a| a.iter().map(|s| expand(s, &env)).collect())
        };
        let command = expand_all(&c.command).unwrap_or_default();
        let args = expand_all(&c.args);
        out.push(ContainerSpec {
            name: c.name.clone(),
            image: image_ref,
            argv: images::argv(image, &command, args.as_deref()),
            env,
            mounts,
            probe: probe(c),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand_as_kubernetes_does() {
        let vars = vec![("POD_NAMESPACE".to_string(), "mesh".to_string())];
        assert_eq!(
            expand("https://istiod-lite.$(POD_NAMESPACE).svc:15012", &vars),
            "https://istiod-lite.mesh.svc:15012"
        );
        assert_eq!(
            expand("$(NOPE) $$(POD_NAMESPACE)", &vars),
            "$(NOPE) $(POD_NAMESPACE)"
        );
    }
}
