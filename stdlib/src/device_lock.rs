//! One queue per device for the steps of model stages. Stages that share a device (an
//! evaluation running while a phase trains, two branches of an ablation) take turns step by
//! step, in the order they asked, instead of oversubscribing it: two steps at once on one GPU
//! would compete for its memory and its cores, and on the CPU backend for the same threads.
//!
//! The model-stage driver ([`crate::driver`]) holds a device's turn for the whole of each
//! step (`StageRun::step`); loading the model before the first step and saving it after the
//! last do not take a turn. Stages on different devices (`--device 0` and `--device 1`, or
//! the CPU and a GPU) never wait for each other.
//!
//! This is a different lock from [`crate::train::autodiff_lock`], which works around a Burn
//! bug and serializes autodiff graph building across the whole process; a step takes its
//! device's turn first and the autodiff lock inside it, never the other way round.
//!
//! Each device keeps the spans (stage, start, end) of its last turns, so tests and the
//! device check can show that steps never overlapped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use longrl_backends::DeviceSpec;

/// Turns kept in a device's history.
const HISTORY: usize = 4096;

/// One turn on a device: who held it, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub holder: String,
    pub start: Instant,
    pub end: Instant,
}

#[derive(Debug, Default)]
struct Queue {
    /// The ticket the next caller draws.
    next: u64,
    /// The ticket whose turn it is.
    serving: u64,
    history: VecDeque<Span>,
}

/// A first-come, first-served lock (a ticket lock): turns are given in the order asked, so a
/// stage that steps in a loop cannot starve another one waiting for the device.
#[derive(Debug, Default)]
pub struct DeviceQueue {
    queue: Mutex<Queue>,
    turn: Condvar,
}

impl DeviceQueue {
    fn state(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for this caller's turn; the turn ends when the guard is dropped.
    pub fn acquire(self: &Arc<Self>, holder: &str) -> DeviceTurn {
        let mut state = self.state();
        let ticket = state.next;
        state.next += 1;
        while state.serving != ticket {
            state = self.turn.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        drop(state);
        DeviceTurn { queue: Arc::clone(self), holder: holder.to_string(), start: Instant::now() }
    }

    /// The last turns taken, oldest first.
    pub fn history(&self) -> Vec<Span> {
        self.state().history.iter().cloned().collect()
    }

    /// Callers waiting or holding the device now.
    pub fn queued(&self) -> u64 {
        let state = self.state();
        state.next - state.serving
    }
}

/// A turn on a device, held until dropped (a panicking step still gives it back).
#[derive(Debug)]
pub struct DeviceTurn {
    queue: Arc<DeviceQueue>,
    holder: String,
    start: Instant,
}

impl Drop for DeviceTurn {
    fn drop(&mut self) {
        let mut state = self.queue.state();
        let span = Span { holder: std::mem::take(&mut self.holder), start: self.start, end: Instant::now() };
        if state.history.len() == HISTORY {
            state.history.pop_front();
        }
        state.history.push_back(span);
        state.serving += 1;
        drop(state);
        self.queue.turn.notify_all();
    }
}

/// The queue of `device` (one per backend kind and index, for the whole process).
pub fn queue(device: DeviceSpec) -> Arc<DeviceQueue> {
    static QUEUES: OnceLock<Mutex<HashMap<DeviceSpec, Arc<DeviceQueue>>>> = OnceLock::new();
    let mut queues = QUEUES.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(queues.entry(device).or_default())
}

/// Waits for a turn on `device` for `holder` (a stage label); see [`DeviceQueue::acquire`].
pub fn acquire(device: DeviceSpec, holder: &str) -> DeviceTurn {
    queue(device).acquire(holder)
}

/// Whether any two spans overlap in time; returns the first such pair.
pub fn first_overlap(spans: &[Span]) -> Option<(Span, Span)> {
    let mut sorted = spans.to_vec();
    sorted.sort_by_key(|s| s.start);
    sorted.windows(2).find(|w| w[1].start < w[0].end).map(|w| (w[0].clone(), w[1].clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use longrl_backends::BackendKind;

    #[test]
    fn turns_on_one_device_never_overlap_and_are_taken_in_order() {
        // A device of its own, so that no other test's turns mix in.
        let device = DeviceSpec::new(BackendKind::Cuda, 97);
        let threads: Vec<_> = (0..3)
            .map(|i| {
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _turn = acquire(device, &format!("stage-{i}"));
                        std::thread::sleep(std::time::Duration::from_micros(300));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("joins");
        }
        let history = queue(device).history();
        assert_eq!(history.len(), 60);
        assert_eq!(first_overlap(&history), None, "two steps ran at once on one device");
        assert_eq!(queue(device).queued(), 0);
        // First come, first served: once every stage waits, they alternate, so no stage
        // holds the device for all of its steps in a row.
        let runs = history.windows(2).filter(|w| w[0].holder != w[1].holder).count();
        assert!(runs >= 10, "turns alternate between waiting stages ({runs} switches)");
    }

    #[test]
    fn different_devices_do_not_wait_for_each_other() {
        let (a, b) = (DeviceSpec::new(BackendKind::Cuda, 98), DeviceSpec::new(BackendKind::Cuda, 99));
        let _held = acquire(a, "holder");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _turn = acquire(b, "other");
            tx.send(()).expect("sends");
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("device b is free while a is held");
    }

    #[test]
    fn a_panicking_step_gives_its_turn_back() {
        let device = DeviceSpec::new(BackendKind::Wgpu, 96);
        let outcome = std::thread::spawn(move || {
            let _turn = acquire(device, "panics");
            panic!("the step failed");
        })
        .join();
        assert!(outcome.is_err());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _turn = acquire(device, "next");
            tx.send(()).expect("sends");
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the device is free again");
    }
}
