//! A pod's volumes as the kubelet makes them, each a directory under the
//! pod's own: `emptyDir`; `hostPath` (under the node's root directory, but
//! `/var/run/netns` is the machine's, where the lab's netns are);
//! `configMap`, `secret`, `downwardAPI` and `projected` (with
//! service-account tokens from the TokenRequest API, bound to the pod and
//! renewed at 80% of their life). ConfigMaps and Secrets are re-read while
//! the pod runs, as the kubelet does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::error::{KubeletError, Result};

/// What a pod's volumes are now.
pub enum Volumes {
    /// Every volume is there: name -> directory.
    Ready(BTreeMap<String, PathBuf>),
    /// Something it needs is missing (a ConfigMap, say); tried again later.
    Waiting(String),
}

/// The volumes of one pod, and when each token is due for renewal.
pub struct PodVolumes {
    pub dir: PathBuf,
    pub node_root: PathBuf,
    tokens_due: BTreeMap<PathBuf, Instant>,
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)
            .map_err(|e| KubeletError::io(format!("creating {}", d.display()), e))?;
    }
    // In place, not renamed: a program that holds the file open or a bind
    // mount of it sees the new content.
    std::fs::write(path, bytes)
        .map_err(|e| KubeletError::io(format!("writing {}", path.display()), e))
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| KubeletError::io(format!("creating {}", dir.display()), e))
}

/// A pod field for the downward API and `fieldRef` environment values.
pub fn field(pod: &Pod, path: &str) -> Option<String> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    Some(match path {
        "metadata.name" => m.name.clone()?,
        "metadata.namespace" => m.namespace.clone()?,
        "metadata.uid" => m.uid.clone()?,
        "spec.nodeName" => spec?.node_name.clone()?,
        "spec.serviceAccountName" => spec?
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        "status.podIP" => status?.pod_ip.clone()?,
        "status.hostIP" => status?.host_ip.clone()?,
        p => {
            let (map, key) = if let Some(k) = p.strip_prefix("metadata.labels['") {
                (m.labels.as_ref()?, k.strip_suffix("']")?)
            } else {
                (
                    m.annotations.as_ref()?,
                    p.strip_prefix("metadata.annotations['")?
                        .strip_suffix("']")?,
                )
            };
            map.get(key)?.clone()
        }
    })
}

fn key_paths(
    items: &Option<Vec<KeyToPath>>,
    data: &BTreeMap<String, Vec<u8>>,
) -> Vec<(String, Vec<u8>)> {
    match items {
        Some(items) => items
            .iter()
            .filter_map(|i| Some((i.path.clone(), data.get(&i.key)?.clone())))
            .collect(),
        None => data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

impl PodVolumes {
    pub fn new(dir: PathBuf, node_root: PathBuf) -> Self {
        PodVolumes {
            dir,
            node_root,
            tokens_due: BTreeMap::new(),
        }
    }

    /// Makes (or refreshes) every volume of `pod`.
    pub async fn sync(&mut self, client: &Client, pod: &Pod) -> Result<Volumes> {
        let mut out = BTreeMap::new();
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for v in &volumes {
            match self.volume(client, pod, v).await? {
                Ok(dir) => {
                    out.insert(v.name.clone(), dir);
                }
                Err(why) => return Ok(Volumes::Waiting(format!("volume {}: {why}", v.name))),
            }
        }
        Ok(Volumes::Ready(out))
    }

    async fn volume(
        &mut self,
        client: &Client,
        pod: &Pod,
        v: &Volume,
    ) -> Result<std::result::Result<PathBuf, String>> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let dir = self.dir.join("volumes").join(&v.name);
        if let Some(h) = &v.host_path {
            let real = h.path.starts_with("/var/run/netns") || h.path.starts_with("/run/netns");
            let p = if real {
                PathBuf::from(&h.path)
            } else {
                self.node_root.join(h.path.trim_start_matches('/'))
            };
            match h.type_.as_deref() {
                Some("Directory") if !p.is_dir() => {
                    return Ok(Err(format!("{} is not a directory on the node", h.path)));
                }
                _ if !real => mkdir(&p)?,
                _ => {}
            }
            return Ok(Ok(p));
        }
        mkdir(&dir)?;
        if v.empty_dir.is_some() {
            return Ok(Ok(dir));
        }
        let files = if let Some(c) = &v.config_map {
            match config_map(client, &ns, &c.name).await? {
                Some(data) => key_paths(&c.items, &data),
                None if c.optional == Some(true) => Vec::new(),
                None => return Ok(Err(format!("ConfigMap {ns}/{} not found", c.name))),
            }
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            match secret(client, &ns, &name).await? {
                Some(data) => key_paths(&s.items, &data),
                None if s.optional == Some(true) => Vec::new(),
                None => return Ok(Err(format!("Secret {ns}/{name} not found"))),
            }
        } else if let Some(d) = &v.downward_api {
            downward(pod, d.items.as_deref().unwrap_or_default())
        } else if let Some(p) = &v.projected {
            match self
                .projected(client, pod, &dir, p.sources.as_deref().unwrap_or_default())
                .await?
            {
                Ok(files) => files,
                Err(why) => return Ok(Err(why)),
            }
        } else {
            return Err(KubeletError::pod(
                format!("{ns}/{}", pod.metadata.name.clone().unwrap_or_default()),
                format!("volume {}: a kind the lab does not make", v.name),
            ));
        };
        for (path, bytes) in files {
            write_if_changed(&dir.join(path), &bytes)?;
        }
        Ok(Ok(dir))
    }

    async fn projected(
        &mut self,
        client: &Client,
        pod: &Pod,
        dir: &Path,
        sources: &[k8s_openapi::api::core::v1::VolumeProjection],
    ) -> Result<std::result::Result<Vec<(String, Vec<u8>)>, String>> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let mut files = Vec::new();
        for s in sources {
            if let Some(t) = &s.service_account_token {
                let path = dir.join(&t.path);
                let due = self
                    .tokens_due
                    .get(&path)
                    .is_none_or(|d| Instant::now() >= *d);
                if due {
                    let ttl = t.expiration_seconds.unwrap_or(3600).max(600);
                    let token = request_token(client, pod, t.audience.clone(), ttl).await?;
                    write_if_changed(&path, token.as_bytes())?;
                    let renew = Duration::from_secs((ttl as u64) * 8 / 10);
                    self.tokens_due.insert(path, Instant::now() + renew);
                }
            }
            if let Some(c) = &s.config_map {
                match config_map(client, &ns, &c.name).await? {
                    Some(data) => files.extend(key_paths(&c.items, &data)),
                    None if c.optional == Some(true) => {}
                    None => return Ok(Err(format!("ConfigMap {ns}/{} not found", c.name))),
                }
            }
            if let Some(sec) = &s.secret {
                match secret(client, &ns, &sec.name).await? {
                    Some(data) => files.extend(key_paths(&sec.items, &data)),
                    None if sec.optional == Some(true) => {}
                    None => return Ok(Err(format!("Secret {ns}/{} not found", sec.name))),
                }
            }
            if let Some(d) = &s.downward_api {
                files.extend(downward(pod, d.items.as_deref().unwrap_or_default()));
            }
        }
        Ok(Ok(files))
    }
}

fn downward(pod: &Pod, items: &[DownwardAPIVolumeFile]) -> Vec<(String, Vec<u8>)> {
    items
        .iter()
        .filter_map(|i| {
            let f = i.field_ref.as_ref()?;
            Some((i.path.clone(), field(pod, &f.field_path)?.into_bytes()))
        })
        .collect()
}

async fn config_map(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| KubeletError::api(format!("reading ConfigMap {ns}/{name}"), e))?;
    Ok(cm.map(|cm| {
        let mut out: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        out.extend(
            cm.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        out
    }))
}

async fn secret(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| KubeletError::api(format!("reading Secret {ns}/{name}"), e))?;
    Ok(s.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    }))
}

/// A token for the pod's service account (TokenRequest), bound to the pod:
/// it stops being valid when the pod is deleted.
async fn request_token(
    client: &Client,
    pod: &Pod,
    audience: Option<String>,
    ttl: i64,
) -> Result<String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a]),
            expiration_seconds: Some(ttl),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    let out = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .map_err(|e| KubeletError::api(format!("a token for ServiceAccount {ns}/{sa}"), e))?;
    out.status
        .and_then(|s| s.token)
        .ok_or_else(|| KubeletError::pod(format!("{ns}/{sa}"), "TokenRequest returned no token"))
}
