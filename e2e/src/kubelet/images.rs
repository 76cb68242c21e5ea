//! The lab's container images: each image the manifests name maps to the
//! workspace's own binaries, laid out as its Dockerfile lays them out
//! (`images/<name>/Dockerfile`: the programs in `/usr/local/bin`, the same
//! ENTRYPOINT and CMD). An image the lab has no mapping for does not run:
//! its pod stays Pending with `ErrImagePull`, as on a node that cannot pull.
//!
//! | image (any registry, any tag) | `/usr/local/bin` | ENTRYPOINT | CMD |
//! | --- | --- | --- | --- |
//! | `istiod-lite` | istiod-lite | istiod-lite | |
//! | `ztunnel` | ztunnel, ztunnel-cni, mesh-cni | | ztunnel --config=/etc/ztunnel/config.yaml |
//! | `waypoint` | waypoint | waypoint | |
//! | `meshctl` | meshctl | meshctl | |
//! | `labapp` | labapp | labapp | |

use std::path::{Path, PathBuf};

use crate::mesh::binary;

use super::error::{KubeletError, Result};

/// One image: its programs, ENTRYPOINT and CMD.
pub struct Image {
    pub name: &'static str,
    pub programs: &'static [&'static str],
    pub entrypoint: &'static [&'static str],
    pub cmd: &'static [&'static str],
}

/// Every image the lab can run (the table above).
pub const IMAGES: &[Image] = &[
    Image {
        name: "istiod-lite",
        programs: &["istiod-lite"],
        entrypoint: &["/usr/local/bin/istiod-lite"],
        cmd: &[],
    },
    Image {
        name: "ztunnel",
        programs: &["ztunnel", "ztunnel-cni", "mesh-cni"],
        entrypoint: &[],
        cmd: &["ztunnel", "--config=/etc/ztunnel/config.yaml"],
    },
    Image {
        name: "waypoint",
        programs: &["waypoint"],
        entrypoint: &["/usr/local/bin/waypoint"],
        cmd: &[],
    },
    Image {
        name: "meshctl",
        programs: &["meshctl"],
        entrypoint: &["/usr/local/bin/meshctl"],
        cmd: &[],
    },
    Image {
        name: "labapp",
        programs: &["labapp"],
        entrypoint: &["/usr/local/bin/labapp"],
        cmd: &[],
    },
];

/// The repository part of an image reference: `ghcr.io/mesh-dev/ztunnel:0.1.0`
/// and `ztunnel@sha256:...` are both `ztunnel`.
pub fn short_name(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

pub fn lookup(image: &str) -> Option<&'static Image> {
    let name = short_name(image);
    IMAGES.iter().find(|i| i.name == name)
}

/// The argv a container runs: `command` replaces ENTRYPOINT (and drops
/// CMD), `args` replaces CMD, as Kubernetes does.
pub fn argv(image: &Image, command: &[String], args: Option<&[String]>) -> Vec<String> {
    let mut out: Vec<String> = if command.is_empty() {
        image.entrypoint.iter().map(|s| s.to_string()).collect()
    } else {
        command.to_vec()
    };
    match args {
        Some(a) => out.extend(a.iter().cloned()),
        None if command.is_empty() => out.extend(image.cmd.iter().map(|s| s.to_string())),
        None => {}
    }
    out
}

/// The image's `/usr/local/bin`: a directory of links to this build's
/// binaries, made once under `root`.
pub fn image_dir(root: &Path, image: &Image) -> Result<PathBuf> {
    let dir = root.join(image.name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| KubeletError::io(format!("creating {}", dir.display()), e))?;
    for p in image.programs {
        let link = dir.join(p);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(binary(p), &link)
                .map_err(|e| KubeletError::io(format!("linking {}", link.display()), e))?;
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_argv_follow_the_dockerfiles() {
        assert_eq!(short_name("ghcr.io/mesh-dev/ztunnel:0.1.0"), "ztunnel");
        assert_eq!(short_name("labapp"), "labapp");
        assert_eq!(short_name("reg:5000/x/waypoint@sha256:ab"), "waypoint");
        assert!(lookup("nginx:1.27").is_none());
        let z = lookup("ghcr.io/mesh-dev/ztunnel:0.1.0").expect("ztunnel");
        assert_eq!(
            argv(z, &[], None),
            ["ztunnel", "--config=/etc/ztunnel/config.yaml"]
        );
        let cmd = vec!["mesh-cni".to_string(), "install".to_string()];
        assert_eq!(argv(z, &cmd, None), ["mesh-cni", "install"]);
        let i = lookup("istiod-lite").expect("istiod-lite");
        let args = vec!["--kube".to_string()];
        assert_eq!(
            argv(i, &[], Some(&args)),
            ["/usr/local/bin/istiod-lite", "--kube"]
        );
    }
}
