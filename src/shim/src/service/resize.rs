//! The running VM follows its containers' limits (sizing.rs decides how
//! much): a container whose limits outgrow the VM gets memory plugged and
//! vCPUs brought online before it is created (or before its new limits
//! are applied, for UpdateContainerResources); what its end or a lower
//! limit frees is given back afterwards. Growing waits until the guest
//! has plugged the memory, so a container never starts in a guest
//! smaller than its limit; shrinking does not wait (the guest unplugs
//! what it can free, and keeps trying).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_protocol::{Request, Response};

use super::state::RunningPod;
use super::TaskError;
use crate::error::Chain;
use crate::sizing::{Ask, Plan, Target};

/// How often the plugged size is read while the guest plugs.
const PLUG_POLL: Duration = Duration::from_millis(10);

/// The VM's shape and what its containers ask for.
#[derive(Debug)]
pub struct Sizing {
    /// Decided at boot.
    pub plan: Plan,
    /// Each container's ask (created, or being created).
    asks: BTreeMap<String, Ask>,
    /// What the VM was last given.
    applied: Target,
    /// The longest the guest may take to plug memory a container needs.
    plug_limit: Duration,
}

impl Sizing {
    /// A VM just booted to `plan`, whose guest is given `plug_limit` to
    /// plug memory.
    pub fn new(plan: Plan, plug_limit: Duration) -> Sizing {
        Sizing {
            plug_limit,
            plan,
            asks: BTreeMap::new(),
            applied: Target {
                vcpus: plan.boot_vcpus,
                plugged_mib: 0,
            },
        }
    }
}

impl RunningPod {
    /// Makes room for container `id` asking `ask` (replacing what it asked
    /// before): grows the VM if the containers now need more. On failure
    /// the container's previous ask is kept and nothing shrinks.
    pub fn grow_for(&self, id: &str, ask: Ask) -> Result<(), TaskError> {
        let mut sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
        let before = sizing.asks.insert(id.to_string(), ask);
        let restore = |sizing: &mut Sizing| match before {
            Some(b) => sizing.asks.insert(id.to_string(), b),
            None => sizing.asks.remove(id),
        };
        let target = match sizing.plan.target(&sizing.asks, id) {
            Ok(t) => t,
            Err(e) => {
                restore(&mut sizing);
                return Err(TaskError::DoesNotFit(e));
            }
        };
        let grown = Target {
            vcpus: target.vcpus.max(sizing.applied.vcpus),
            plugged_mib: target.plugged_mib.max(sizing.applied.plugged_mib),
        };
        // A container with a memory limit waits until the guest has what
        // the limits need (requested now, or right after the boot).
        let wait = ask.memory_mib > 0;
        if let Err(e) = self.apply(&mut sizing, grown, wait) {
            restore(&mut sizing);
            // What was requested for it is given back.
            self.settle_locked(&mut sizing);
            return Err(e);
        }
        Ok(())
    }

    /// What container `id` asks for now.
    pub fn ask_of(&self, id: &str) -> Option<Ask> {
        let sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
        sizing.asks.get(id).copied()
    }

    /// Forgets container `id`'s ask (it is gone, or its create failed)
    /// and gives back what no container needs any more.
    pub fn release(&self, id: &str) {
        let mut sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
        if sizing.asks.remove(id).is_some() {
            self.settle_locked(&mut sizing);
        }
    }

    /// Records container `id`'s new ask without growing (its lower limits
    /// are in force), and gives back what is no longer needed.
    pub fn settle_to(&self, id: &str, ask: Ask) {
        let mut sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
        sizing.asks.insert(id.to_string(), ask);
        self.settle_locked(&mut sizing);
    }

    fn settle_locked(&self, sizing: &mut Sizing) {
        // Fewer asks always fit.
        let Ok(target) = sizing.plan.target(&sizing.asks, "") else {
            return;
        };
        if target != sizing.applied {
            if let Err(e) = self.apply(sizing, target, false) {
                tracing::warn!(error = %Chain(&e), "cannot give back the pod's unused resources");
            }
        }
    }

    /// Brings the VM to `target`: memory requested (and, when `wait`,
    /// waited for until plugged), vCPUs brought on- or offline.
    fn apply(&self, sizing: &mut Sizing, target: Target, wait: bool) -> Result<(), TaskError> {
        if target.plugged_mib != sizing.applied.plugged_mib {
            self.request(sizing, target.plugged_mib)?;
        }
        if wait && target.plugged_mib > 0 {
            self.wait_plugged(target.plugged_mib, sizing.plug_limit)?;
        }
        if target.vcpus != sizing.applied.vcpus {
            let answer = self
                .vm
                .call(Request::SetOnlineCpus {
                    online: target.vcpus,
                })
                .map_err(TaskError::agent(format!(
                    "bring {} vCPUs online",
                    target.vcpus
                )))?;
            match answer {
                Response::Cpus { online, .. } if online == target.vcpus => {}
                other => {
                    return Err(TaskError::UnexpectedReply {
                        request: "SetOnlineCpus",
                        reply: format!("{other:?}"),
                    })
                }
            }
            sizing.applied.vcpus = target.vcpus;
            tracing::info!(vcpus = target.vcpus, "the pod's microVM vCPUs were resized");
        }
        Ok(())
    }

    /// Asks the guest to have `mib` plugged (it plugs on its own).
    fn request(&self, sizing: &mut Sizing, mib: u64) -> Result<(), TaskError> {
        self.vm.request_memory(mib).map_err(|e| TaskError::Vm {
            action: "resize the memory of",
            source: Box::new(e),
        })?;
        sizing.applied.plugged_mib = mib;
        tracing::info!(
            plugged_mib = mib,
            boot_mib = sizing.plan.boot_mib,
            "the pod's microVM memory was resized"
        );
        Ok(())
    }

    /// Right after the boot: asks for the pod's own size, without waiting
    /// (the guest plugs its memory and, on a thread of the shim's, brings
    /// its vCPUs online while the pod's first containers are made; a
    /// container that needs them waits in [`RunningPod::grow_for`]).
    pub fn presize(self: &Arc<Self>) {
        let vcpus = {
            let mut sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
            let Ok(target) = sizing.plan.target(&sizing.asks, "") else {
                return;
            };
            if target.plugged_mib > sizing.applied.plugged_mib {
                if let Err(e) = self.request(&mut sizing, target.plugged_mib) {
                    tracing::warn!(error = %Chain(&e), "cannot plug the pod's memory");
                }
            }
            (target.vcpus > sizing.applied.vcpus).then_some(target.vcpus)
        };
        let Some(vcpus) = vcpus else {
            return;
        };
        let pod = self.clone();
        let spawned = std::thread::Builder::new()
            .name("shim-presize".into())
            .spawn(
                move || match pod.vm.call(Request::SetOnlineCpus { online: vcpus }) {
                    Ok(Response::Cpus { online, .. }) => {
                        let mut sizing = pod.sizing.lock().unwrap_or_else(|e| e.into_inner());
                        // A container's resize may have got there first.
                        if online > sizing.applied.vcpus {
                            sizing.applied.vcpus = online;
                        }
                        tracing::info!(vcpus = online, "the pod's vCPUs are online");
                    }
                    Ok(other) => {
                        tracing::warn!(reply = ?other, "SetOnlineCpus answered unexpectedly")
                    }
                    Err(e) => {
                        tracing::warn!(error = %Chain(&e), "cannot bring the pod's vCPUs online")
                    }
                },
            );
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to bring the pod's vCPUs online");
        }
    }

    /// Waits until the guest has plugged at least `mib`.
    fn wait_plugged(&self, mib: u64, limit: Duration) -> Result<(), TaskError> {
        let start = Instant::now();
        loop {
            let plugged = self.vm.plugged_memory().map_err(|e| TaskError::Vm {
                action: "read the plugged memory of",
                source: Box::new(e),
            })?;
            if plugged >= mib {
                tracing::debug!(
                    mib,
                    took_ms = start.elapsed().as_millis() as u64,
                    "memory plugged"
                );
                return Ok(());
            }
            if start.elapsed() >= limit {
                return Err(TaskError::NotPlugged {
                    asked_mib: mib,
                    plugged_mib: plugged,
                    within: limit,
                });
            }
            std::thread::sleep(PLUG_POLL);
        }
    }
}
