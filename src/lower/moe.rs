//! Mixture-of-experts blocks in the schedule: one [`Step::Moe`] per block runs the router,
//! every expert's MLP on the rows routed to it, and the weighted sum added to the residual
//! stream. The experts' projections are ordinary [`LinearSlot`](super::LinearSlot)s (each with
//! its format from the precision map), listed per expert in the block's [`MoeSlot`]; they have
//! no `Step::Linear` of their own.
//!
//! On the kernel backends a block is six launches ([`Schedule::moe_launches`]): the router
//! (softmax, top-k, renormalisation) writes each token's experts and weights; a grouped GEMV
//! per projection runs every expert at once over the (token, slot) pairs routed to it, with
//! the experts' weights stacked (so the experts of a projection share one format there:
//! [`Schedule::check_expert_kernels`]); SiLU-gate over the pair rows; the weighted combine adds
//! each token's pairs into the residual stream. The CPU reference runs the same arithmetic
//! (`runtime::cpu::moe`).

use serde::Serialize;

use super::schedule::{linear_slot, Act, Schedule, Step, StepLaunch};
use super::{KernelSpec, Param, PrecisionMap};
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

/// The projections of an expert's MLP, in [`MoeSlot::experts`] order.
pub const EXPERT_PROJECTIONS: [&str; 3] = ["gate", "up", "down"];

impl Schedule {
    /// The largest `top_k` of the schedule's MoE blocks (0 without any): the pair rows per
    /// token the expert buffers hold.
    pub fn moe_top_k(&self) -> usize {
        self.moes.iter().map(|m| m.top_k).max().unwrap_or(0)
    }

    /// The widest expert intermediate size (the gate projections' outputs; 0 without MoE
    /// blocks).
    pub fn expert_ffn(&self) -> usize {
        (self.moes.iter().flat_map(|m| m.experts.iter()))
            .map(|e| self.linears[e[0]].shape.n)
            .max()
            .unwrap_or(0)
    }

    /// The MoE block and projection (0 gate, 1 up, 2 down) expert slot `linear` belongs to.
    pub fn expert_of(&self, linear: usize) -> Option<(usize, usize)> {
        self.moes.iter().enumerate().find_map(|(b, m)| {
            (m.experts.iter())
                .find_map(|e| e.iter().position(|&l| l == linear))
                .map(|p| (b, p))
        })
    }

    /// The grouped GEMV of projection `proj` of MoE block `moe` (expert 0's shape: every
    /// expert's is the same, [`Schedule::check_expert_kernels`]).
    pub fn expert_kernel(&self, moe: usize, proj: usize) -> KernelSpec {
        let m = &self.moes[moe];
        KernelSpec::ExpertGemv {
            shape: self.linears[m.experts[0][proj]].shape,
            experts: m.experts.len(),
            top_k: m.top_k,
            gather: proj != 2,
        }
    }

    /// The kernels of MoE block `moe`, in launch order.
    pub fn moe_kernels(&self, moe: usize) -> [KernelSpec; 6] {
        let m = &self.moes[moe];
        let act = self.act;
        let ffn = self.linears[m.experts[0][0]].shape.n;
        [
            KernelSpec::MoeRoute {
                experts: m.experts.len(),
                hidden: self.dims.hidden,
                top_k: m.top_k,
                norm_top_k: m.norm_top_k,
                act,
            },
            self.expert_kernel(moe, 0),
            self.expert_kernel(moe, 1),
            KernelSpec::SiluMul {
                dim: ffn,
                act,
                quant: false,
            },
            self.expert_kernel(moe, 2),
            KernelSpec::MoeCombine {
                hidden: self.dims.hidden,
                top_k: m.top_k,
                act,
            },
        ]
    }

    /// The six launches of MoE block `moe` over `m` tokens (see the module doc); every one
    /// but the SiLU-gate (over the `m * top_k` pair rows) takes the token count.
    pub fn moe_launches(&self, moe: usize, m: usize) -> Vec<StepLaunch> {
        use Param as P;
        let b = &self.moes[moe];
        let expert = |p: usize, src: Act, dst: Act| {
            vec![
                P::ExpertCodes(moe, p),
                P::ExpertScales(moe, p),
                P::ExpertGlobals(moe, p),
                P::ExpertBias(moe, p),
                P::RouteIds,
                P::Act(src),
                P::Act(dst),
                P::Rows,
            ]
        };
        let params = [
            vec![
                P::Act(b.src),
                P::Router(moe),
                P::RouteIds,
                P::RouteWeights,
                P::Rows,
            ],
            expert(0, b.src, Act::ExpertGate),
            expert(1, b.src, Act::ExpertUp),
            vec![P::Act(Act::ExpertGate), P::Act(Act::ExpertUp), P::Rows],
            expert(2, Act::ExpertGate, Act::ExpertOut),
            vec![
                P::Act(Act::ExpertOut),
                P::RouteIds,
                P::RouteWeights,
                P::Act(b.dst),
                P::Rows,
            ],
        ];
        (self.moe_kernels(moe).into_iter().zip(params))
            .map(|(spec, params)| StepLaunch {
                rows: if matches!(spec, KernelSpec::SiluMul { .. }) {
                    m * b.top_k
                } else {
                    m
                },
                entry: spec.name(),
                spec,
                params,
                row0: 0,
            })
            .collect()
    }

    /// The grouped expert kernels stack a projection's experts, so every expert of it must
    /// have the same format and shape (the planner's default: a block's experts share one
    /// format); per-expert formats run on the CPU reference only.
    pub fn check_expert_kernels(&self) -> Result<()> {
        for m in &self.moes {
            for (p, name) in EXPERT_PROJECTIONS.iter().enumerate() {
                let first = &self.linears[m.experts[0][p]];
                let odd = (m.experts.iter()).find(|e| self.linears[e[p]].shape != first.shape);
                if let Some(e) = odd {
                    let other = &self.linears[e[p]];
                    return Err(Error::Layer {
                        layer: m.name.clone(),
                        reason: format!(
                            "the generated kernels run a block's {name} projections as one \
                             grouped GEMV over stacked weights, so its experts need one format \
                             and shape: {} is {} {}x{}, {} is {} {}x{} (plans with \
                             --per-expert-formats run on the CPU reference only)",
                            first.name,
                            first.shape.format,
                            first.shape.n,
                            first.shape.k,
                            other.name,
                            other.shape.format,
                            other.shape.n,
                            other.shape.k
                        ),
                    });
                }
            }
        }
        Ok(())
    }

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
            w8a8: false,
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
