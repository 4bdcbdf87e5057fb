//! Which node each replica id belongs to, when peer certificates name nodes
//! (`OPENCLAW_PEER_TLS_BIND_NODE`; issue 12: every message bound to its sender).
//!
//! Mutual TLS proves that a connection's client holds a key the peer CA signed. With nodes
//! bound, that certificate also names one node (`<node>.<server name>`,
//! [`crate::peer_tls::node_name`]), so the `node` a message says it is from is checked against
//! it. Its replica id cannot be: replica ids are drawn at random at every start, and no
//! certificate issued ahead of time can name one. So **the first node a replica id is heard
//! from, certified, owns it**, and a message from another node that claims it is refused
//! (`reason="sender_not_certified"`). A loan request carries only a replica id: it is taken
//! only over a certificate that names the node owning that id.
//!
//! Bounds: a node keeps its [`MAX_IDS_PER_NODE`] most recent ids (each restart brings one; an
//! id forgotten is the oldest incarnation's, long gone), and the table keeps the
//! [`MAX_NODES`] nodes heard from most recently. A member cannot grow it at will: it can only
//! ever speak as the one node its certificate names.
//!
//! What this does not bind (docs/crdt.md, "Peer authentication"): the state a message relays
//! for other replicas (their bucket components, their escrow records) is still taken from any
//! member, checked for plausibility only; and a member that learns a new replica id (every
//! member sees them) before a replica has heard from its owner can claim it there first.

use std::collections::{HashMap, VecDeque};

/// Replica ids kept per node: its current incarnation and its recent restarts.
pub const MAX_IDS_PER_NODE: usize = 8;
/// Nodes kept, the one heard from longest ago forgotten first.
pub const MAX_NODES: usize = 1024;

/// Replica id to node, as heard over certificates naming the node.
#[derive(Debug, Default)]
pub struct NodeBindings {
    owner: HashMap<u64, String>,
    /// Per node: its ids, oldest first, and when it was last heard from (a counter).
    nodes: HashMap<String, (VecDeque<u64>, u64)>,
    heard: u64,
}

impl NodeBindings {
    /// Takes `replica` as `node`'s (its certificate named `node` already): `Err` names the
    /// node that owns the id when another does.
    pub fn bind(&mut self, replica: u64, node: &str) -> Result<(), String> {
        if let Some(owner) = self.owner.get(&replica)
            && owner != node
        {
            return Err(format!(
                "replica id {replica} belongs to node {owner:?}, not {node:?}"
            ));
        }
        self.heard += 1;
        let heard = self.heard;
        if !self.nodes.contains_key(node) && self.nodes.len() >= MAX_NODES {
            self.forget_least_recent();
        }
        let (ids, last) = self.nodes.entry(node.to_owned()).or_default();
        *last = heard;
        if !ids.contains(&replica) {
            ids.push_back(replica);
            self.owner.insert(replica, node.to_owned());
            if ids.len() > MAX_IDS_PER_NODE
                && let Some(oldest) = ids.pop_front()
            {
                self.owner.remove(&oldest);
            }
        }
        Ok(())
    }

    /// The node that owns `replica`, if it has been heard from.
    pub fn node_of(&self, replica: u64) -> Option<&str> {
        self.owner.get(&replica).map(String::as_str)
    }

    fn forget_least_recent(&mut self) {
        let Some(node) = self
            .nodes
            .iter()
            .min_by_key(|(_, (_, last))| *last)
            .map(|(node, _)| node.clone())
        else {
            return;
        };
        if let Some((ids, _)) = self.nodes.remove(&node) {
            for id in ids {
                self.owner.remove(&id);
            }
        }
    }

    /// Ids held, over all nodes. For tests.
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_belongs_to_the_first_node_heard_with_it() {
        let mut bindings = NodeBindings::default();
        assert_eq!(bindings.bind(7, "node-a"), Ok(()));
        assert_eq!(bindings.bind(7, "node-a"), Ok(()), "again, the same node");
        let refused = bindings.bind(7, "node-b").unwrap_err();
        assert!(refused.contains("\"node-a\""), "{refused}");
        assert_eq!(bindings.node_of(7), Some("node-a"));
        assert_eq!(bindings.bind(8, "node-b"), Ok(()));
        assert_eq!(bindings.node_of(8), Some("node-b"));
        assert_eq!(bindings.node_of(9), None);
    }

    #[test]
    fn a_node_keeps_its_most_recent_ids_and_the_table_its_most_recent_nodes() {
        let mut bindings = NodeBindings::default();
        for id in 0..MAX_IDS_PER_NODE as u64 + 3 {
            bindings.bind(id, "restarting").unwrap();
        }
        assert_eq!(bindings.len(), MAX_IDS_PER_NODE);
        assert_eq!(
            bindings.node_of(0),
            None,
            "the oldest incarnation, forgotten"
        );
        assert_eq!(
            bindings.node_of(MAX_IDS_PER_NODE as u64 + 2),
            Some("restarting")
        );

        let mut bindings = NodeBindings::default();
        bindings.bind(1_000_000, "kept").unwrap();
        for n in 0..MAX_NODES as u64 {
            bindings.bind(n, &format!("node-{n}")).unwrap();
            // "kept" is heard from all along; node-0 only once, first.
            bindings.bind(1_000_000, "kept").unwrap();
        }
        assert_eq!(bindings.len(), MAX_NODES);
        assert_eq!(bindings.node_of(1_000_000), Some("kept"));
        assert_eq!(bindings.node_of(0), None, "the node heard from longest ago");
        assert_eq!(bindings.node_of(1), Some("node-1"));
    }
}
