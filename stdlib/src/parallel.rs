//! Data-parallel gradients over several devices of one backend: each replica computes the
//! gradients of its share of an optimizer step's work on its own copy of the weights, in its
//! own thread, and burn-collective's all-reduce sums them across the replicas, so the
//! optimizer applies exactly what one device accumulating every share would.

use std::sync::Mutex;

use burn::collective::{CollectiveConfig, PeerId, ReduceOperation, finish_collective, register, reset_collective};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend, Device, DeviceId};

use crate::error::StageError;

/// The most replicas a training stage may ask for.
pub const MAX_DEVICES: usize = 64;

/// The devices of `n` replicas: `first` and the next `n - 1` of its kind (on the CPU
/// backend, the same processor `n` times).
pub fn replica_devices<B: Backend>(first: &B::Device, n: usize) -> Vec<B::Device> {
    let id = first.to_id();
    (0..n).map(|r| B::Device::from_id(DeviceId { type_id: id.type_id, index_id: id.index_id + r as u16 })).collect()
}

/// Which items of `work` (indices into it) each of `replicas` replicas takes: every
/// `replicas`-th one, so that shares differ in size by at most one. Replicas left without
/// an item are dropped from the list.
pub fn shares(work: &[usize], replicas: usize) -> Vec<Vec<usize>> {
    let replicas = replicas.clamp(1, work.len().max(1));
    (0..replicas).map(|r| work.iter().skip(r).step_by(replicas).copied().collect()).collect()
}

/// burn-collective keeps one collective per backend and process: two stages training at
/// once take turns.
static COLLECTIVE: Mutex<()> = Mutex::new(());

/// Runs `work(replica, model)` for each device in its own thread, on a copy of `model` moved
/// to that device (fresh autodiff leaves, the same parameter ids), and returns the sum of
/// the replicas' gradients (on `devices[0]`) with each replica's own result, in replica
/// order. Nothing is reduced if any replica fails: the first error is returned.
pub fn all_reduce_gradients<B, M, T, W>(model: &M, devices: &[B::Device], work: W) -> Result<(GradientsParams, Vec<T>), StageError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    T: Send,
    W: Fn(usize, M) -> Result<(GradientsParams, T), StageError> + Sync,
{
    let replicas: Vec<M> = devices.iter().map(|device| model.clone().fork(device)).collect();
    let computed: Vec<Result<(GradientsParams, T), StageError>> = std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = replicas.into_iter().enumerate().map(|(r, replica)| scope.spawn(move || work(r, replica))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| Err(StageError::Failed(panic_text(&panic))))).collect()
    });
    let mut grads = Vec::with_capacity(computed.len());
    let mut outputs = Vec::with_capacity(computed.len());
    for result in computed {
        let (g, out) = result?;
        grads.push(g);
        outputs.push(out);
    }
    let summed = sum_across::<B::InnerBackend>(grads, devices)?;
    Ok((summed, outputs))
}

/// All-reduces (sums) each replica's gradients with burn-collective, one peer per device,
/// and returns replica 0's copy of the sum.
fn sum_across<B: Backend>(grads: Vec<GradientsParams>, devices: &[B::Device]) -> Result<GradientsParams, StageError> {
    if grads.len() == 1 {
        return grads.into_iter().next().ok_or_else(|| StageError::Failed("no replica".into()));
    }
    let lengths: Vec<usize> = grads.iter().map(GradientsParams::len).collect();
    if lengths.iter().any(|&len| len != lengths[0]) {
        return Err(StageError::Failed(format!(
            "data-parallel replicas hold gradients of different parameters ({lengths:?} tensors); every replica must run the whole model"
        )));
    }
    let _turn = COLLECTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let config = CollectiveConfig::default().with_num_devices(grads.len());
    let reduced: Vec<Result<GradientsParams, StageError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = grads
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(r, (g, device))| {
                let config = config.clone();
                scope.spawn(move || -> Result<GradientsParams, StageError> {
                    let peer = PeerId(r as u32);
                    let failed = |e| StageError::Failed(format!("data-parallel all-reduce (replica {r}): {e:?}"));
                    register::<B>(peer, device.clone(), config).map_err(failed)?;
                    let summed = g.all_reduce::<B>(peer, ReduceOperation::Sum).map_err(failed)?;
                    finish_collective::<B>(peer).map_err(failed)?;
                    Ok(summed)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| Err(StageError::Failed(panic_text(&panic))))).collect()
    });
    let mut first = None;
    for (r, result) in reduced.into_iter().enumerate() {
        match result {
            Ok(g) if r == 0 => first = Some(g),
            Ok(_) => {}
            Err(e) => {
                // A failed peer leaves the others registered: start the next step clean.
                reset_collective::<B>();
                return Err(e);
            }
        }
    }
    first.ok_or_else(|| StageError::Failed("no replica".into()))
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("a panic");
    format!("a data-parallel replica failed: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_round_robin_and_never_empty() {
        assert_eq!(shares(&[4, 7, 1, 9, 3], 2), vec![vec![4, 1, 3], vec![7, 9]]);
        assert_eq!(shares(&[4, 7], 3), vec![vec![4], vec![7]]);
        assert_eq!(shares(&[5], 1), vec![vec![5]]);
        assert_eq!(shares(&[], 2), vec![Vec::<usize>::new()]);
    }
}
