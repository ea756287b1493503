//! Deterministic fan-in: an input port fed by several edges yields their items in a fixed
//! round-robin order over the edges (in recipe order), whatever the producers' timing, so a
//! run and its resume see the same sequence.
//!
//! With one edge this is the channel itself. With several, the reader waits for the edge
//! whose turn it is, while it keeps taking in items that other edges send early (they wait
//! in memory until their turn). Taking them in is what keeps a merge from deadlocking: a
//! producer that runs ahead never stalls on a full queue that the reader will only drain
//! later, even when the slow edge's producer waits on it upstream (a source feeding both
//! edges, say). The cost is memory when producers run at very different rates.

use std::collections::VecDeque;

use crossbeam_channel::{Receiver, TryRecvError};

use crate::stage::Item;

/// Items held early on one port above which a warning says the merge is buffering.
const EARLY_WARNING: usize = 4096;

/// The edges into one input port.
pub struct FanIn {
    edges: Vec<EdgeQueue>,
    /// The edge whose item comes next.
    turn: usize,
    warned: bool,
}

struct EdgeQueue {
    /// `None` once its producer has finished (and the channel is closed).
    rx: Option<Receiver<Item>>,
    /// Items that arrived before their turn.
    early: VecDeque<Item>,
}

/// What the port can give right now.
pub(crate) enum Due {
    Item(Item),
    /// The edge whose turn it is has sent nothing yet: receive more.
    Wait,
    /// Every edge is closed and drained.
    End,
}

impl FanIn {
    /// A port fed by `receivers`, one per edge, in recipe order (none: not connected).
    pub fn new(receivers: Vec<Receiver<Item>>) -> Self {
        let edges = receivers.into_iter().map(|rx| EdgeQueue { rx: Some(rx), early: VecDeque::new() }).collect();
        Self { edges, turn: 0, warned: false }
    }

    /// Whether any edge feeds the port.
    pub fn is_connected(&self) -> bool {
        !self.edges.is_empty()
    }

    /// The item whose turn it is, if it is here. A closed, drained edge gives up its turns.
    pub(crate) fn take_due(&mut self) -> Due {
        let count = self.edges.len();
        for offset in 0..count {
            let index = (self.turn + offset) % count;
            let edge = &mut self.edges[index];
            if edge.early.is_empty()
                && let Some(rx) = &edge.rx
            {
                // The cheap path, and the only one with a single edge: the item is queued.
                match rx.try_recv() {
                    Ok(item) => edge.early.push_back(item),
                    Err(TryRecvError::Empty) => return Due::Wait,
                    Err(TryRecvError::Disconnected) => edge.rx = None,
                }
            }
            if let Some(item) = edge.early.pop_front() {
                self.turn = (index + 1) % count;
                return Due::Item(item);
            }
        }
        Due::End
    }

    /// The open edges' receivers (cheap clones), with their edge index, to wait on.
    pub(crate) fn open_receivers(&self) -> Vec<(usize, Receiver<Item>)> {
        self.edges.iter().enumerate().filter_map(|(i, edge)| edge.rx.clone().map(|rx| (i, rx))).collect()
    }

    /// Files what a wait on edge `index` received: an item for its turn, or its end.
    pub(crate) fn accept(&mut self, index: usize, received: Option<Item>, port: &str, stage: &str) {
        let Some(edge) = self.edges.get_mut(index) else { return };
        match received {
            Some(item) => edge.early.push_back(item),
            None => edge.rx = None,
        }
        let held: usize = self.edges.iter().map(|e| e.early.len()).sum();
        if held >= EARLY_WARNING && !self.warned {
            self.warned = true;
            tracing::warn!(
                stage,
                port,
                held,
                "input `{port}` holds {held} items that came before their turn: one of its producers runs far ahead of another"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::ModelRef;

    fn item(n: usize) -> Item {
        Item::Model(ModelRef { dir: format!("m{n}").into() })
    }

    fn name(item: &Item) -> String {
        match item {
            Item::Model(m) => m.dir.display().to_string(),
            other => panic!("unexpected {:?}", other.kind()),
        }
    }

    /// Drains a port the way `StageIo::recv` does, without timeouts.
    fn drain(port: &mut FanIn) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match port.take_due() {
                Due::Item(item) => out.push(name(&item)),
                Due::End => return out,
                Due::Wait => {
                    let open = port.open_receivers();
                    let mut select = crossbeam_channel::Select::new();
                    for (_, rx) in &open {
                        select.recv(rx);
                    }
                    let operation = select.select();
                    let (edge, rx) = &open[operation.index()];
                    let received = operation.recv(rx).ok();
                    port.accept(*edge, received, "records", "test");
                }
            }
        }
    }

    #[test]
    fn edges_take_turns_in_recipe_order_whatever_arrives_first() {
        let (a_tx, a_rx) = crossbeam_channel::unbounded();
        let (b_tx, b_rx) = crossbeam_channel::unbounded();
        // Edge b's items all arrive before edge a's.
        for n in 0..3 {
            b_tx.send(item(10 + n)).expect("send");
        }
        drop(b_tx);
        for n in 0..5 {
            a_tx.send(item(n)).expect("send");
        }
        drop(a_tx);
        let mut port = FanIn::new(vec![a_rx, b_rx]);
        assert_eq!(drain(&mut port), ["m0", "m10", "m1", "m11", "m2", "m12", "m3", "m4"]);
    }

    #[test]
    fn a_merge_fed_by_threads_gives_one_order_every_time() {
        let run = |delay_a: u64, delay_b: u64| {
            let (a_tx, a_rx) = crossbeam_channel::bounded(2);
            let (b_tx, b_rx) = crossbeam_channel::bounded(2);
            let producer = |tx: crossbeam_channel::Sender<Item>, base: usize, delay: u64| {
                std::thread::spawn(move || {
                    for n in 0..20 {
                        if n % 5 == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(delay));
                        }
                        tx.send(item(base + n)).expect("send");
                    }
                })
            };
            let a = producer(a_tx, 0, delay_a);
            let b = producer(b_tx, 100, delay_b);
            let order = drain(&mut FanIn::new(vec![a_rx, b_rx]));
            a.join().expect("producer a");
            b.join().expect("producer b");
            order
        };
        let first = run(0, 3);
        assert_eq!(first.len(), 40);
        assert_eq!(first, run(3, 0), "the order must not depend on which producer is faster");
        assert_eq!(first[..4], ["m0", "m100", "m1", "m101"]);
    }

    #[test]
    fn a_slow_edge_whose_producer_waits_on_the_fast_one_does_not_deadlock() {
        // One source feeds both edges (a diamond): edge a keeps one item in ten, edge b all of
        // them, through queues of one item. The reader must take b's items early.
        let (a_tx, a_rx) = crossbeam_channel::bounded(1);
        let (b_tx, b_rx) = crossbeam_channel::bounded(1);
        let source = std::thread::spawn(move || {
            for n in 0..200 {
                if n % 10 == 0 {
                    a_tx.send(item(n)).expect("send a");
                }
                b_tx.send(item(1000 + n)).expect("send b");
            }
        });
        let order = drain(&mut FanIn::new(vec![a_rx, b_rx]));
        source.join().expect("source");
        assert_eq!(order.len(), 220);
        assert_eq!(order[..3], ["m0", "m1000", "m10"]);
    }

    #[test]
    fn an_unconnected_port_ends_at_once() {
        let mut port = FanIn::new(Vec::new());
        assert!(!port.is_connected());
        assert!(matches!(port.take_due(), Due::End));
    }
}
