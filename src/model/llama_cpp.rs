//! llama.cpp conventions that differ from Hugging Face: tensor names (`blk.N.attn_q` vs
//! `model.layers.N.self_attn.q_proj`) and the row permutation `convert_hf_to_gguf.py`
//! applies to q_proj/k_proj of llama models so that its RoPE can rotate adjacent pairs.
//! Both directions are here: the GGUF reader undoes them, the synthetic writer applies them.

/// The Hugging Face name of a llama.cpp tensor name, if it is one the decoder uses.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The llama.cpp name of a Hugging Face tensor name (inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let g = match part {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// llama.cpp's permutation of q/k rows: within each of `n_head` groups of `rows / n_head`
/// rows, row `t * half + j` moves to `2 * j + t` (t in {0, 1}, half = head_dim / 2).
/// Rows are `data.len() / rows` wide.
pub fn permute_rows(data: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    move_rows(data, rows, n_head, true)
}

/// Inverse of [`permute_rows`].
pub fn unpermute_rows(data: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    move_rows(data, rows, n_head, false)
}

fn move_rows(data: &[f32], rows: usize, n_head: usize, forward: bool) -> Vec<f32> {
    let cols = data.len() / rows;
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for t in 0..2 {
            for j in 0..half {
                let hf_row = h * hd + t * half + j;
                let gguf_row = h * hd + 2 * j + t;
                let (src, dst) = if forward {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            (
                "blk.12.attn_q.bias",
                "model.layers.12.self_attn.q_proj.bias",
            ),
            (
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
            ),
            (
                "blk.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.2.attn_k_norm.weight",
                "model.layers.2.self_attn.k_norm.weight",
            ),
        ] {
            assert_eq!(hf_name(g).as_deref(), Some(h));
            assert_eq!(gguf_name(h).as_deref(), Some(g));
        }
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn permutation_matches_llama_cpp() {
        // numpy: w.reshape(1, 2, 2, cols).swapaxes(1, 2).reshape(4, cols) -> rows 0, 2, 1, 3.
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect(); // 4 rows x 2 cols
        let p = permute_rows(&w, 4, 1);
        assert_eq!(p, vec![0., 1., 4., 5., 2., 3., 6., 7.]);
        // Two heads of head_dim 4: each group of 4 rows permuted on its own.
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect(); // 8 rows x 1 col
        assert_eq!(permute_rows(&w, 8, 2), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let w: Vec<f32> = (0..96).map(|x| x as f32 * 0.5).collect();
        assert_eq!(unpermute_rows(&permute_rows(&w, 12, 2), 12, 2), w);
    }
}
