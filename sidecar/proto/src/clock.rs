//! Vector timestamps: one counter per member and one for the coordinator.
//!
//! Per epoch the request to cut (`Cut`), the local checkpoint, its acknowledgement
//! (`CutDone`), the "every member has cut" message (`Release`) and the local store advance
//! the clocks, so a member's own component advances by 5 per round. Other messages carry
//! the sender's clock and are merged on receipt without advancing it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The coordinator's own component in vector timestamps.
pub const COORDINATOR: &str = "coordinator";

/// A vector timestamp: one counter per member and one for the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorClock(pub BTreeMap<String, u64>);

impl VectorClock {
    /// The component of `who`.
    pub fn get(&self, who: &str) -> u64 {
        self.0.get(who).copied().unwrap_or(0)
    }

    /// An event of `me`: its own component advances.
    pub fn tick(&mut self, me: &str) {
        *self.0.entry(me.to_owned()).or_insert(0) += 1;
    }

    /// Takes the component-wise maximum with `other`.
    pub fn merge(&mut self, other: &VectorClock) {
        for (k, v) in &other.0 {
            let e = self.0.entry(k.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
    }

    /// A receive by `me` of a message stamped `other`: maximum, then advance.
    pub fn receive(&mut self, me: &str, other: &VectorClock) {
        self.merge(other);
        self.tick(me);
    }

    /// The clock as a vector in `order` (members, then the coordinator).
    pub fn to_vec(&self, order: &[&str]) -> Vec<u64> {
        order.iter().map(|k| self.get(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of checkpointing with vector timestamps: a VMM and four VMs, vectors (VM1..VM4, VMM). The VMM
    /// sends the request, each VM receives it, checkpoints, acks; the VMM takes the acks
    /// one by one and answers each with "done"; each VM then stores.
    #[test]
    fn worked_example_of_a_round() {
        let vms = ["vm1", "vm2", "vm3", "vm4"];
        let order = ["vm1", "vm2", "vm3", "vm4", COORDINATOR];
        let mut vmm = VectorClock::default();
        let mut vm: Vec<VectorClock> = vec![VectorClock::default(); 4];
        vmm.tick(COORDINATOR); // before sending the request
        let request = vmm.clone();
        let mut acks = Vec::new();
        for (i, name) in vms.iter().enumerate() {
            vm[i].receive(name, &request);
            vm[i].tick(name); // checkpoint
            vm[i].tick(name); // before sending the ack
            acks.push(vm[i].clone());
        }
        assert_eq!(vm[0].to_vec(&order), [3, 0, 0, 0, 1]);
        assert_eq!(vm[1].to_vec(&order), [0, 3, 0, 0, 1]);
        for (i, name) in vms.iter().enumerate() {
            vmm.receive(COORDINATOR, &acks[i]);
            vmm.tick(COORDINATOR); // before sending "done"
            let done = vmm.clone();
            vm[i].receive(name, &done);
            vm[i].tick(name); // store
        }
        assert_eq!(vm[0].to_vec(&order), [5, 0, 0, 0, 3]);
        assert_eq!(vm[1].to_vec(&order), [3, 5, 0, 0, 5]);
        assert_eq!(vm[2].to_vec(&order), [3, 3, 5, 0, 7]);
        assert_eq!(vm[3].to_vec(&order), [3, 3, 3, 5, 9]);
        assert_eq!(vmm.to_vec(&order), [3, 3, 3, 3, 9]);
        for (i, name) in vms.iter().enumerate() {
            assert_eq!(vm[i].get(name), 5, "each VM's own component reaches 5 in the round");
        }
    }
}
