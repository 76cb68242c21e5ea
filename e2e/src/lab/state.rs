//! What the lab records in `<dir>/lab.json` (its nodes, pods, services,
//! namespaces, processes and netns: the schema is `mesh_core::lab_file`,
//! which `meshctl --lab` reads too), and the [`Lab`] handle over them.

use std::path::{Path, PathBuf};

pub use mesh_core::lab_file::{KubeState, LabState, NodeState, PodState, ProcState, ServiceState};

use super::{CONTROL_IP_HOST, Error};

pub struct Lab {
    pub dir: PathBuf,
    pub state: LabState,
}

impl Lab {
    pub fn state_file(dir: &Path) -> PathBuf {
        LabState::path(dir)
    }

    pub fn load(dir: &Path) -> Result<Lab, Error> {
        let text = std::fs::read_to_string(Self::state_file(dir))
            .map_err(|e| format!("no lab at {}: {e}", dir.display()))?;
        Ok(Lab {
            dir: dir.to_path_buf(),
            state: serde_json::from_str(&text)?,
        })
    }

    pub fn save(&self) -> Result<(), Error> {
        std::fs::write(
            Self::state_file(&self.dir),
            serde_json::to_vec_pretty(&self.state)?,
        )?;
        Ok(())
    }

    pub fn net(&self) -> String {
        format!("10.{}", 100 + self.state.id as u32)
    }

    pub fn control_ip(&self) -> String {
        format!("{}.0.{CONTROL_IP_HOST}", self.net())
    }

    pub(crate) fn ns_name(&self, tag: &str) -> String {
        format!("{}{tag}", self.state.prefix)
    }

    pub fn pod(&self, key: &str) -> Option<&PodState> {
        self.state.pods.get(key)
    }
}
