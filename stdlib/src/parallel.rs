//! Data-parallel gradients over several devices of one backend: each replica computes the
//! gradients of its share of an optimizer step's work on its own copy of the weights, in its
//! own thread, and burn-collective's all-reduce sums them across the replicas, so the
//! optimizer applies exactly what one device accumulating every share would.
//!
//! Several processes (nodes) are not joined yet: burn-collective 0.21's global mode hangs
//! on a node's second all-reduce (its `SyncService::sync` clears a copy of the list of
//! synced peers, not the list), so one session serves a single operation.

use std::sync::Mutex;

use burn::collective::{CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register, reset_collective};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend, Device, DeviceId};
use burn::tensor::{Tensor, TensorPrimitive};

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
    let summed = sum_across::<B, M>(model, grads, devices)?;
    Ok((summed, outputs))
}

/// Sums the replicas' gradients, flattened into one tensor each, and returns the sum on
/// `devices[0]`. Replicas on distinct devices all-reduce with burn-collective (one
/// operation per optimizer step); replicas that share a device (the CPU backend) are added
/// on it in replica order, because burn-collective orders peers of equal device ids as a
/// hash map iterates, and with three or more the float sum would change from run to run.
/// Two replicas add the same either way (`a + b == b + a`), so they take the collective path.
fn sum_across<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: Vec<GradientsParams>,
    devices: &[B::Device],
) -> Result<GradientsParams, StageError> {
    if grads.len() == 1 {
        return grads.into_iter().next().ok_or_else(|| StageError::Failed("no replica".into()));
    }
    let mut flats = Vec::with_capacity(grads.len());
    let mut presence: Option<Vec<bool>> = None;
    for (r, (mut g, device)) in grads.into_iter().zip(devices).enumerate() {
        let (flat, present) = flatten::<B, M>(model, &mut g, device);
        match &presence {
            Some(first) if *first != present => {
                return Err(StageError::Failed(format!(
                    "data-parallel replica {r} has gradients for other parameters than replica 0 (their autodiff graphs interfered, or the model is not the same); the step is not applied"
                )));
            }
            Some(_) => {}
            None => presence = Some(present),
        }
        flats.push(flat);
    }
    let present = presence.unwrap_or_default();
    let ids: Vec<DeviceId> = devices.iter().map(Device::to_id).collect();
    let shared_device = ids.iter().all(|id| *id == ids[0]);
    let flat = if shared_device && flats.len() > 2 {
        let mut flats = flats.into_iter();
        let first = flats.next().ok_or_else(|| StageError::Failed("no replica".into()))?;
        flats.fold(first, |sum, flat| sum.add(flat.to_device(&devices[0])))
    } else {
        all_reduce_flat::<B::InnerBackend>(flats, devices)?
    };
    Ok(unflatten::<B, M>(model, flat, &present))
}

/// burn-collective's all-reduce (sum) of one flat tensor per replica, one peer per device;
/// replica 0's copy of the result.
fn all_reduce_flat<B: Backend>(flats: Vec<Tensor<B, 1>>, devices: &[B::Device]) -> Result<Tensor<B, 1>, StageError> {
    let _turn = COLLECTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let config = CollectiveConfig::default().with_num_devices(flats.len());
    let register_now = start_session::<B>(devices);
    let reduced: Vec<Result<Tensor<B, 1>, StageError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = flats
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(r, (flat, device))| {
                let config = config.clone();
                scope.spawn(move || -> Result<Tensor<B, 1>, StageError> {
                    let peer = PeerId(r as u32);
                    let failed = |e| StageError::Failed(format!("data-parallel all-reduce (replica {r}): {e:?}"));
                    if register_now {
                        register::<B>(peer, device.clone(), config).map_err(failed)?;
                    }
                    let summed = all_reduce::<B>(peer, flat.into_primitive().tensor(), ReduceOperation::Sum).map_err(failed)?;
                    Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| Err(StageError::Failed(panic_text(&panic))))).collect()
    });
    let mut first = None;
    for (r, result) in reduced.into_iter().enumerate() {
        match result {
            Ok(flat) if r == 0 => first = Some(flat),
            Ok(_) => {}
            Err(e) => {
                // A failed peer leaves the others' operation unfinished: the next step opens
                // a new session.
                end_session::<B>();
                return Err(e);
            }
        }
    }
    first.ok_or_else(|| StageError::Failed("no replica".into()))
}

/// The registered collective session, if one is open: its backend and its peers' devices
/// (burn-collective keeps one collective per backend type).
static SESSION: Mutex<Option<(std::any::TypeId, Vec<DeviceId>)>> = Mutex::new(None);

/// Whether the replicas must register before this step's all-reduce: the first step, or
/// one on another backend or other devices than the open session's (closed first).
fn start_session<B: Backend>(devices: &[B::Device]) -> bool {
    let key = (std::any::TypeId::of::<B>(), devices.iter().map(Device::to_id).collect::<Vec<_>>());
    let mut session = SESSION.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if session.as_ref() == Some(&key) {
        return false;
    }
    if let Some((_, open)) = session.take() {
        for r in 0..open.len() {
            let _ = finish_collective::<B>(PeerId(r as u32));
        }
        reset_collective::<B>();
    }
    *session = Some(key);
    true
}

fn end_session<B: Backend>() {
    reset_collective::<B>();
    *SESSION.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
}

/// `grads` of `model`'s float parameters laid end to end in the module's visit order, on
/// `device`, and which parameters had one (those without are left out).
///
/// # Shapes
/// - returns `[total elements of the parameters with a gradient]`
fn flatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    device: &B::Device,
) -> (Tensor<B::InnerBackend, 1>, Vec<bool>) {
    struct Flatten<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        parts: Vec<Tensor<B::InnerBackend, 1>>,
        present: Vec<bool>,
        device: &'a B::Device,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let grad = self.grads.remove::<B::InnerBackend, D>(param.id);
            self.present.push(grad.is_some());
            if let Some(grad) = grad {
                let n = grad.shape().num_elements();
                self.parts.push(grad.to_device(self.device).reshape([n]));
            }
        }
    }
    let mut visitor = Flatten::<B> { grads, parts: Vec::new(), present: Vec::new(), device };
    model.visit(&mut visitor);
    let flat = if visitor.parts.is_empty() { Tensor::zeros([0], device) } else { Tensor::cat(visitor.parts, 0) };
    (flat, visitor.present)
}

/// The inverse of [`flatten`]: each present parameter's slice of `flat`, in its shape.
fn unflatten<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, flat: Tensor<B::InnerBackend, 1>, present: &[bool]) -> GradientsParams {
    struct Unflatten<'a, B: AutodiffBackend> {
        flat: Tensor<B::InnerBackend, 1>,
        offset: usize,
        present: std::slice::Iter<'a, bool>,
        grads: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.present.next() != Some(&true) {
                return;
            }
            let shape = param.val().shape();
            let n = shape.num_elements();
            let part = self.flat.clone().slice(self.offset..self.offset + n).reshape::<D, _>(shape);
            self.offset += n;
            self.grads.register::<B::InnerBackend, D>(param.id, part);
        }
    }
    let mut visitor = Unflatten::<B> { flat, offset: 0, present: present.iter(), grads: GradientsParams::new() };
    model.visit(&mut visitor);
    visitor.grads
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("a panic");
    format!("a data-parallel replica failed: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Distribution;
    use longrl_backends::{CpuDevice, CpuTrain};

    /// The gradients of `sum(linear(x))` for one batch of inputs.
    fn grads_of(model: &Linear<CpuTrain>, x: Tensor<CpuTrain, 2>) -> GradientsParams {
        let loss = model.forward(x).sum();
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn weight_grad(grads: &GradientsParams, model: &Linear<CpuTrain>) -> Vec<f32> {
        let grad: Tensor<longrl_backends::Cpu, 2> = grads.get(model.weight.id).expect("a weight gradient");
        grad.into_data().to_vec().expect("f32")
    }

    #[test]
    fn replicas_sum_to_the_gradients_of_the_whole_batch_and_a_failure_leaves_no_session_behind() {
        let device = CpuDevice::default();
        let model = LinearConfig::new(6, 3).init::<CpuTrain>(&device);
        let batches: Vec<Tensor<CpuTrain, 2>> = (0..3).map(|_| Tensor::random([4, 6], Distribution::Normal(0.0, 1.0), &device)).collect();
        let whole = grads_of(&model, Tensor::cat(batches.clone(), 0));
        let devices = replica_devices::<CpuTrain>(&device, 3);
        for round in 0..2 {
            let (summed, outputs) =
                all_reduce_gradients(&model, &devices, |r, replica: Linear<CpuTrain>| Ok((grads_of(&replica, batches[r].clone()), r)))
                    .expect("all-reduce");
            assert_eq!(outputs, vec![0, 1, 2]);
            for (a, b) in weight_grad(&summed, &model).iter().zip(weight_grad(&whole, &model)) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "round {round}: {a} vs {b}");
            }
        }
        // A replica that fails: the error comes back, no collective operation waits for it,
        // and the next step (here with two replicas) runs.
        let failed = all_reduce_gradients(&model, &devices, |r, replica: Linear<CpuTrain>| {
            if r == 1 {
                Err(StageError::Failed("replica one ran out of memory".into()))
            } else {
                Ok((grads_of(&replica, batches[r].clone()), r))
            }
        });
        assert!(matches!(failed, Err(StageError::Failed(ref m)) if m.contains("out of memory")));
        let (summed, _) =
            all_reduce_gradients(&model, &devices[..2], |r, replica: Linear<CpuTrain>| Ok((grads_of(&replica, batches[r].clone()), r)))
                .expect("all-reduce after a failure");
        let two = grads_of(&model, Tensor::cat(batches[..2].to_vec(), 0));
        for (a, b) in weight_grad(&summed, &model).iter().zip(weight_grad(&two, &model)) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn shares_are_round_robin_and_never_empty() {
        assert_eq!(shares(&[4, 7, 1, 9, 3], 2), vec![vec![4, 1, 3], vec![7, 9]]);
        assert_eq!(shares(&[4, 7], 3), vec![vec![4], vec![7]]);
        assert_eq!(shares(&[5], 1), vec![vec![5]]);
        assert_eq!(shares(&[], 2), vec![Vec::<usize>::new()]);
    }
}
