//! Cross-format example tests of the public `Format` / `QuantizedMatrix` API: names, layout
//! sizes, tails, special values, `fake_quantize == dequantize ∘ quantize`, activations, and a
//! timing probe (ignored). Property tests are in `proptests.rs`.

use super::fp4::Fp4Block;
use super::mxfp4::Mxfp4Block;
use super::*;
use half::f16;

/// Shapes that exercise empty matrices, single elements and partial blocks.
const SHAPES: [(usize, usize); 10] = [
    (0, 0),
    (3, 0),
    (0, 5),
    (1, 1),
    (3, 17),
    (2, 33),
    (4, 16),
    (5, 32),
    (7, 100),
    (64, 576),
];

pub(super) fn test_matrix(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
    // Deterministic pseudo-random values with a wide dynamic range.
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            u * 2f32.powi((s % 9) as i32 - 4)
        })
        .collect()
}

pub(super) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn names_parse_display_and_serde() {
    for f in Format::ALL {
        assert_eq!(f.to_string(), f.name());
        assert_eq!(f.name().to_uppercase().parse::<Format>().unwrap(), f);
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(json, format!("\"{}\"", f.name()));
        assert_eq!(serde_json::from_str::<Format>(&json).unwrap(), f);
    }
    assert!(matches!(
        "fp6".parse::<Format>(),
        Err(Error::UnknownFormat { .. })
    ));
    assert_eq!(Format::Fp16.block_size(), None);
    assert_eq!(Format::Fp8.block_size(), None);
    assert_eq!(Format::Nvfp4.block_size(), Some(16));
    assert_eq!(Format::Mxfp4.block_size(), Some(32));
}

#[test]
fn weight_bytes_matches_quantize_output() {
    for f in Format::ALL {
        for (rows, cols) in SHAPES {
            let q = f.quantize(&test_matrix(rows, cols, 1), rows, cols);
            q.validate().unwrap();
            assert_eq!(
                q.total_bytes(),
                f.weight_bytes(rows, cols),
                "{f} {rows}x{cols}"
            );
            assert_eq!(q.codes.len(), rows * q.row_stride_bytes());
        }
    }
    // Worked numbers for a 1536 x 576 SmolLM2 MLP matrix.
    let (r, c) = (1536u64, 576u64);
    assert_eq!(Format::Fp16.weight_bytes(1536, 576), 2 * r * c);
    assert_eq!(Format::Fp8.weight_bytes(1536, 576), r * c + 4 * r);
    assert_eq!(
        Format::Nvfp4.weight_bytes(1536, 576),
        r * c / 2 + r * c / 16 + 4
    );
    assert_eq!(
        Format::Mxfp4.weight_bytes(1536, 576),
        r * c / 2 + r * c / 32
    );
    // Tails: 17 columns is two 16-blocks (16 bytes of codes) and one 32-block.
    assert_eq!(Format::Nvfp4.weight_bytes(3, 17), 3 * 16 + 3 * 2 + 4);
    assert_eq!(Format::Mxfp4.weight_bytes(3, 17), 3 * 16 + 3);
}

#[test]
fn fake_quantize_equals_dequantize_of_quantize_on_fixed_shapes() {
    for f in Format::ALL {
        for (rows, cols) in SHAPES {
            let w = test_matrix(rows, cols, 7);
            let fake = f.fake_quantize_weights(&w, rows, cols);
            assert!(same_bits(&fake, &f.quantize(&w, rows, cols).dequantize()));
            let mut act = w.clone();
            f.fake_quantize_activations(&mut act, rows, cols);
            assert!(same_bits(&fake, &act), "{f}: activations use the same math");
        }
    }
}

#[test]
fn tails_get_their_own_scale_and_zero_padding() {
    for cols in [1usize, 17, 33] {
        for f in [Format::Nvfp4, Format::Mxfp4] {
            let block = f.block_size().unwrap();
            let mut w = vec![0.5f32; 2 * cols];
            w[cols - 1] = 3.0; // the last element of row 0 sits in the tail block
            let q = f.quantize(&w, 2, cols);
            let stride = q.row_stride_bytes();
            assert_eq!(stride, cols.div_ceil(block) * block / 2);
            for row in q.codes.chunks(stride) {
                // Nibbles past `cols` are zero codes.
                for i in cols..stride * 2 {
                    assert_eq!(e2m1::unpack_nibble(row, i), 0, "{f} cols={cols} nibble {i}");
                }
            }
            let tail = (cols - 1) / block;
            let bpr = q.blocks_per_row();
            let bytes = match &q.scales {
                Scales::Nvfp4 { block, .. } | Scales::Mxfp4 { block } => block.clone(),
                s => panic!("unexpected {s:?}"),
            };
            if f == Format::Mxfp4 {
                // The tail's scale comes from the elements present only.
                let present = &w[tail * block..cols];
                assert_eq!(
                    bytes[tail],
                    Mxfp4Block::scale_byte(present, super::mx_scale_rule())
                );
                assert_eq!(
                    bytes[tail],
                    mxfp4::scale_byte_for_amax(3.0, super::mx_scale_rule())
                );
                if tail > 0 {
                    assert_eq!(
                        bytes[0],
                        mxfp4::scale_byte_for_amax(0.5, super::mx_scale_rule())
                    );
                }
            }
            let back = q.dequantize();
            assert_eq!(back.len(), 2 * cols);
            assert!(same_bits(&back, &f.fake_quantize_weights(&w, 2, cols)));
            assert_eq!(bytes.len(), 2 * bpr);
        }
    }
    // cols = 17: an isolated tail element with a different magnitude gets its own scale.
    let mut w = vec![1.0f32; 17];
    w[16] = 0.01;
    let back = Format::Mxfp4.fake_quantize_weights(&w, 1, 17);
    assert_eq!(
        back[16], 0.0,
        "shares a 32-block with 1.0: too small for that scale"
    );
    let back = Format::Nvfp4.fake_quantize_weights(&w, 1, 17);
    assert!(
        (back[16] - 0.01).abs() < 0.01 * 0.07,
        "own 16-block scale: {}",
        back[16]
    );
}

#[test]
fn fp8_rows_have_independent_scales_and_zero_rows_read_back_as_zero() {
    let mut w = vec![0f32; 3 * 4];
    w[..4].copy_from_slice(&[448.0, -1.0, 2.0, 3.0]);
    w[8..].copy_from_slice(&[1e-3, 0.0, -2e-3, 4.48e-3]);
    let q = Format::Fp8.quantize(&w, 3, 4);
    let Scales::Row(scales) = &q.scales else {
        panic!("fp8 has row scales")
    };
    assert_eq!(scales, &vec![1.0, 0.0, 4.48e-3 / 448.0]);
    assert_eq!(&q.codes[4..8], &[0, 0, 0, 0]);
    let back = q.dequantize();
    assert_eq!(&back[..4], &w[..4]);
    assert_eq!(&back[4..8], &[0.0; 4]);
}

#[test]
fn fp16_codes_are_little_endian_halves() {
    let q = Format::Fp16.quantize(&[1.0, -2.0, 65504.0, 1e6], 2, 2);
    assert_eq!(q.scales, Scales::None);
    assert_eq!(&q.codes[..4], &[0x00, 0x3C, 0x00, 0xC0]);
    let back = q.dequantize();
    assert_eq!(&back[..3], &[1.0, -2.0, 65504.0]);
    assert_eq!(back[3], f32::INFINITY, "IEEE overflow");
    let mut x = [0.1f32, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0];
    Format::Fp16.fake_quantize_activations(&mut x, 1, 3);
    let want = [f16::from_f32(0.1).to_f32(), 1.0, 1.0 + 2.0 / 1024.0];
    assert_eq!(x, want, "ties round to even");
}

#[test]
fn special_values_through_every_format() {
    let w = [
        1.0f32,
        f32::NAN,
        f32::INFINITY,
        -0.5,
        f32::NEG_INFINITY,
        0.0,
        2.0,
        -3.0,
    ];
    for f in Format::QUANTIZED {
        let back = f.fake_quantize_weights(&w, 1, 8);
        assert!(back[1].is_nan(), "{f}: NaN propagates");
        if f != Format::Fp8 {
            assert!(back.iter().all(|v| v.is_nan()), "{f}: NaN marks its block");
        }
        let w2 = [
            1.0f32,
            0.0,
            f32::INFINITY,
            -0.5,
            f32::NEG_INFINITY,
            0.0,
            2.0,
            -3.0,
        ];
        let back = f.fake_quantize_weights(&w2, 1, 8);
        assert!(back.iter().all(|v| v.is_finite()), "{f}: inf saturates");
        assert_eq!(back[2], -back[4]);
        let ok = back[2] >= 2.5 && back[2] <= 3.0 * (1.0 + 1e-6);
        assert!(ok, "{f}: inf -> block max {}", back[2]);
    }
}

#[test]
fn validate_rejects_inconsistent_matrices() {
    let mut q = Format::Nvfp4.quantize(&test_matrix(2, 20, 3), 2, 20);
    q.validate().unwrap();
    q.codes.pop();
    assert!(matches!(q.validate(), Err(Error::InvalidArgument { .. })));
    let mut q = Format::Mxfp4.quantize(&test_matrix(2, 20, 3), 2, 20);
    q.scales = Scales::Row(vec![1.0; 2]);
    assert!(q.validate().is_err());
    let mut q = Format::Fp8.quantize(&test_matrix(2, 20, 3), 2, 20);
    q.scales = Scales::Row(vec![1.0; 3]);
    assert!(q.validate().is_err());
}

#[test]
#[should_panic(expected = "expected 2 x 3")]
fn shape_mismatch_panics() {
    Format::Fp8.fake_quantize_weights(&[0.0; 5], 2, 3);
}

#[test]
fn nvfp4_activation_scale_is_per_tensor_and_dynamic() {
    // Token 0 is small; token 1's amax sets the tensor scale and so changes token 0's result.
    let tok0: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) * 1e-3).collect();
    let mut alone = tok0.clone();
    Format::Nvfp4.fake_quantize_activations(&mut alone, 1, 16);
    let mut both = tok0.clone();
    both.extend((0..16).map(|i| i as f32 * 100.0));
    Format::Nvfp4.fake_quantize_activations(&mut both, 2, 16);
    assert_ne!(&both[..16], &alone[..]);
    // Same as quantizing the buffer as a matrix (global from the whole buffer).
    let q = Format::Nvfp4.quantize(&both[..], 2, 16);
    let Scales::Nvfp4 { global, .. } = q.scales else {
        panic!()
    };
    assert_eq!(global, 1500.0 / 2688.0);
}
