//! Mixture-of-experts blocks in the schedule: one [`Step::Moe`] per block runs the router,
//! every expert's MLP on the rows routed to it, and the weighted sum added to the residual
//! stream. The experts' projections are ordinary [`LinearSlot`](super::LinearSlot)s (each with
//! its format from the precision map), listed per expert in the block's [`MoeSlot`]; they have
//! no `Step::Linear` of their own.
//!
//! The generated kernels have no grouped expert GEMV/GEMM yet, so a schedule with MoE blocks
//! runs on the CPU interpreter only ([`Schedule::check_kernels`](super::Schedule::check_kernels)
//! refuses it for the kernel backends, naming the block).

use serde::Serialize;

use super::schedule::{linear_slot, Act, Schedule, Step};
use super::PrecisionMap;
use crate::error::{Error, Result};
use crate::ir::{Graph, LinearKind, NodeId, Op};

/// One MoE block of the schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoeSlot {
    /// The router's graph node name (`model.layers.3.mlp.gate`).
    pub name: String,
    /// Decoder layer of the block.
    pub layer: usize,
    /// The router weight `[experts, hidden]` (FP32).
    pub router_tensor: String,
    pub top_k: usize,
    pub norm_top_k: bool,
    /// The buffer the block reads (the normalised residual) and the one its output is added
    /// to (the residual stream).
    pub src: Act,
    pub dst: Act,
    /// Per expert: the linear slots of its gate, up and down projections.
    pub experts: Vec<[usize; 3]>,
}

impl MoeSlot {
    /// The expert linear slots of every expert, gate, up, down in turn.
    pub fn linears(&self) -> impl Iterator<Item = usize> + '_ {
        self.experts.iter().flatten().copied()
    }
}

/// Where a MoE node goes during [`Schedule::build`]: `true` when `id` belongs to a MoE block
/// (the schedule then holds no buffer for its value), after recording what the block needs.
/// `src`: the buffer holding operand 0, where one does; `precision`: the formats of the
/// experts' projections.
pub(super) fn build_node(
    graph: &Graph,
    id: NodeId,
    s: &mut Schedule,
    src: Option<Act>,
    precision: &PrecisionMap,
) -> Result<bool> {
    let node = graph.node(id);
    let block = || -> Result<usize> {
        s.moes.len().checked_sub(1).ok_or_else(|| Error::Layer {
            layer: node.name.clone(),
            reason: "an expert node before its block's router".into(),
        })
    };
    match &node.op {
        Op::Router {
            tensor,
            experts,
            top_k,
            norm_top_k,
            ..
        } => {
            let layer = node.layer.ok_or_else(|| Error::Layer {
                layer: node.name.clone(),
                reason: "a router outside a decoder block".into(),
            })?;
            let src = src.ok_or_else(|| Error::Layer {
                layer: node.name.clone(),
                reason: "the router's input is not held in a buffer".into(),
            })?;
            // The block's output must be the branch of the residual add that follows it.
            let dst = residual_of_combine(graph, id)?;
            s.moes.push(MoeSlot {
                name: node.name.clone(),
                layer,
                router_tensor: tensor.clone(),
                top_k: *top_k,
                norm_top_k: *norm_top_k,
                src,
                dst,
                experts: vec![[usize::MAX; 3]; *experts],
            });
            s.steps.push(Step::Moe {
                moe: s.moes.len() - 1,
            });
            Ok(true)
        }
        Op::ExpertRows { .. } | Op::MoeCombine { .. } => Ok(true),
        Op::SiluMul { .. } => Ok(graph
            .inputs(id)
            .first()
            .is_some_and(|&g| matches!(&graph.node(g).op, Op::Linear(l) if l.expert.is_some()))),
        Op::Linear(l) => {
            let Some(expert) = l.expert else {
                return Ok(false);
            };
            let b = block()?;
            let which = match l.kind {
                LinearKind::Gate => 0,
                LinearKind::Up => 1,
                LinearKind::Down => 2,
                other => {
                    return Err(Error::Layer {
                        layer: node.name.clone(),
                        reason: format!("an expert's {} projection", other.name()),
                    })
                }
            };
            let slot = s.linears.len();
            let entry = s.moes[b]
                .experts
                .get_mut(expert)
                .ok_or_else(|| Error::Layer {
                    layer: node.name.clone(),
                    reason: format!("expert {expert} is outside its block"),
                })?;
            entry[which] = slot;
            s.linears
                .push(linear_slot(&node.name, l, precision.get(&node.name), false));
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The residual buffer a router's block adds into: its combine must be the branch (operand 1)
/// of a residual add whose stream is held in `X`.
fn residual_of_combine(graph: &Graph, router: NodeId) -> Result<Act> {
    let combine = graph
        .consumers(router)
        .into_iter()
        .find(|&c| matches!(graph.node(c).op, Op::MoeCombine { .. }));
    let add = combine.and_then(|c| match graph.consumers(c).as_slice() {
        [add]
            if matches!(graph.node(*add).op, Op::Add { .. })
                && graph.inputs(*add).get(1) == Some(&c) =>
        {
            Some(*add)
        }
        _ => None,
    });
    match add {
        Some(_) => Ok(Act::X),
        None => Err(Error::Layer {
            layer: graph.node(router).name.clone(),
            reason: "its block's combine does not feed a residual add".into(),
        }),
    }
}

/// Every MoE block has all three projections of every expert.
pub(super) fn check_complete(s: &Schedule) -> Result<()> {
    for m in &s.moes {
        if let Some(e) = m.experts.iter().position(|p| p.contains(&usize::MAX)) {
            return Err(Error::Layer {
                layer: m.name.clone(),
                reason: format!("expert {e} lacks a gate, up or down projection"),
            });
        }
    }
    Ok(())
}

/// The expected share of a decode step of `batch` tokens that reaches one expert, with each
/// token routed to `top_k` of `experts` uniformly and independently: the expert is touched
/// with probability `p = 1 - (1 - top_k/experts)^batch` (so `experts * p` distinct experts
/// move their weights per block: `top_k` at batch 1, all of them as the batch grows), and a
/// touched expert sees `batch * top_k / (experts * p)` rows on average. Returns
/// `(p, rows when touched)`.
pub fn expert_load(batch: usize, experts: usize, top_k: usize) -> (f64, usize) {
    let b = batch.max(1) as f64;
    let share = top_k as f64 / experts.max(1) as f64;
    let p = 1.0 - (1.0 - share).powf(b);
    let rows = (b * share / p.max(f64::MIN_POSITIVE)).ceil().max(1.0) as usize;
    (p, rows)
}

/// The expected work of one expert projection `shape` in a decode step of `batch` tokens
/// ([`expert_load`]): a launch on the rows it sees, weighted by the chance it runs.
pub fn expert_work(
    shape: &super::LinearShape,
    batch: usize,
    experts: usize,
    top_k: usize,
    arch: super::Arch,
) -> super::KernelWork {
    let (p, rows) = expert_load(batch, experts, top_k);
    let w = super::linear_work(shape, rows, arch);
    super::KernelWork {
        bytes: p * w.bytes,
        flops: p * w.flops,
        decode_instructions: p * w.decode_instructions,
        path: w.path,
    }
}

impl Schedule {
    /// The work of MoE block `moe` in a decode step of `rows` tokens: the router's product
    /// (FP32 weights, on the SIMT path) and every expert's expected share ([`expert_work`]).
    pub fn moe_work(&self, moe: usize, rows: usize, arch: super::Arch) -> super::KernelWork {
        let m = &self.moes[moe];
        let experts = m.experts.len();
        let router = super::LinearShape {
            n: experts,
            k: self.dims.hidden,
            format: super::WeightFormat::F32,
            bias: false,
            accumulate: false,
            act: self.act,
        };
        let mut total = super::linear_work(&router, rows, arch);
        for slot in m.linears() {
            let w = expert_work(&self.linears[slot].shape, rows, experts, m.top_k, arch);
            total.bytes += w.bytes;
            total.flops += w.flops;
            total.decode_instructions += w.decode_instructions;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::expert_load;

    #[test]
    fn expert_load_is_top_k_at_batch_one_and_all_experts_at_large_batch() {
        let (p, rows) = expert_load(1, 8, 2);
        assert!((8.0 * p - 2.0).abs() < 1e-12 && rows == 1);
        let (p, rows) = expert_load(256, 8, 2);
        assert!(p > 0.999_999 && rows == 64, "{p} {rows}");
        // Expected rows over all experts = batch * top_k.
        let (p, rows) = expert_load(4, 16, 2);
        assert!(
            (16.0 * p * rows as f64 - 8.0).abs() < 16.0 * p,
            "{p} {rows}"
        );
    }
}
