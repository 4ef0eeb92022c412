//! OPF's long 1-padded chains (methods.md §3): the paper's and the released code's shapes and
//! their parameter counts, the same construction for mpolm's model widths, and the exact
//! (untruncated) decomposition over such a chain reproducing W.

mod common;

use common::gaussian;
use mpo::{opf_split, preset, Mpo, MpoShape};

fn ones(k: usize) -> Vec<usize> {
    vec![1; k]
}

fn chain(a: usize, k: usize, b: usize) -> Vec<usize> {
    [vec![a], ones(k), vec![b]].concat()
}

#[test]
fn paper_tables_4_and_5_bert_base() {
    // Table 4/5: [64,1×9,48] × [32,1×9,24] for FFN, [32,1×9,24]² for attention, "6.6× per
    // matrix", 3072×768 → 15.63M and 768×768 → 3.91M, every bond 1152 or 576.
    let ffn = MpoShape::opf_chain(3072, 768, 11).unwrap();
    assert_eq!(ffn.row_factors, chain(64, 9, 48));
    assert_eq!(ffn.col_factors, chain(32, 9, 24));
    assert_eq!(ffn, preset("opf-bert-base-ffn-3072x768").unwrap());
    // Hand count: 64·32·1152 + 9·1152² + 1152·48·24.
    assert_eq!(ffn.full_params(), 2_359_296 + 9 * 1_327_104 + 1_327_104);
    assert_eq!(ffn.full_params(), 15_630_336);
    assert!(ffn.full_bonds()[1..11].iter().all(|&d| d == 1152));
    let att = MpoShape::opf_chain(768, 768, 11).unwrap();
    assert_eq!(att, preset("opf-bert-base-attn-768x768").unwrap());
    assert_eq!(att.full_params(), 589_824 + 9 * 331_776 + 331_776);
    assert!(att.full_bonds()[1..11].iter().all(|&d| d == 576));
    for s in [&ffn, &att] {
        assert_eq!(format!("{:.1}", s.full_ratio()), "6.6");
    }
    // FFN-out is the transpose: same count.
    let out = MpoShape::opf_chain(768, 3072, 11).unwrap();
    assert_eq!(out, ffn.transposed());
    assert_eq!(out.full_params(), 15_630_336);
}

#[test]
fn paper_bert_large_svd_and_released_15_site_chains() {
    let large = MpoShape::opf_chain(4096, 1024, 11).unwrap();
    assert_eq!(large, preset("opf-bert-large-ffn-4096x1024").unwrap());
    // OPF-SVD: n = 2, [64,48] × [32,24], one bond of 1152: 2048·1152 + 1152·1152.
    let svd = MpoShape::opf_chain(3072, 768, 2).unwrap();
    assert_eq!(svd, preset("opf-svd-3072x768").unwrap());
    assert_eq!(svd.full_params(), 2048 * 1152 + 1152 * 1152);
    assert_eq!(svd.full_ratio(), 1.5625);
    assert_eq!(
        MpoShape::opf_chain(768, 768, 2).unwrap(),
        preset("opf-svd-768x768").unwrap()
    );
    // Released code: [32,1×13,24], "8.9×": 1024·576 + 13·576² + 576·576 = 5,234,688.
    let c15 = MpoShape::opf_chain(768, 768, 15).unwrap();
    assert_eq!(c15, preset("opf-15site-768x768").unwrap());
    assert_eq!(c15.full_params(), 5_234_688);
    assert_eq!(format!("{:.1}", c15.full_ratio()), "8.9");
    assert_eq!(
        MpoShape::opf_chain(3072, 768, 15).unwrap(),
        preset("opf-15site-3072x768").unwrap()
    );
}

#[test]
fn our_model_widths() {
    // (rows, cols, preset, bond, params) for each of mpolm's model widths, 11 sites; the
    // counts by hand: a·c·d + 9·d² + d·b·e with d = min(a·c, b·e).
    let cases = [
        (
            384,
            384,
            "opf-minilm-attn-384x384",
            256,
            576 * 256 + 10 * 65_536,
        ),
        (
            1536,
            384,
            "opf-minilm-ffn-in-1536x384",
            512,
            1152 * 512 + 10 * 262_144,
        ),
        (
            576,
            576,
            "opf-smollm2-attn-576x576",
            576,
            576 * 576 + 10 * 331_776,
        ),
        (
            1536,
            576,
            "opf-smollm2-ffn-in-1536x576",
            768,
            1152 * 768 + 9 * 589_824 + 768 * 768,
        ),
        (
            896,
            896,
            "opf-qwen-attn-896x896",
            784,
            1024 * 784 + 10 * 614_656,
        ),
        (
            4864,
            896,
            "opf-qwen-ffn-in-4864x896",
            1792,
            2432 * 1792 + 9 * 3_211_264 + 1792 * 1792,
        ),
    ];
    for (r, c, name, bond, params) in cases {
        let s = MpoShape::opf_chain(r, c, 11).unwrap();
        assert_eq!(s, preset(name).unwrap(), "{name}");
        assert!(s.full_bonds()[1..11].iter().all(|&d| d == bond), "{name}");
        assert_eq!(s.full_params(), params, "{name}");
        assert!(s.full_ratio() > 2.0, "{name}: {}", s.full_ratio());
    }
    assert_eq!(opf_split(384), Some((24, 16)));
    assert_eq!(opf_split(4864), Some((76, 64)));
    assert_eq!(opf_split(192), Some((16, 12)));
}

#[test]
fn shapes_that_do_not_factor_are_refused() {
    // A prime size has no split, nor have sizes below 4; a chain needs 2..=64 sites.
    for d in [1, 2, 3, 5, 7, 97] {
        assert_eq!(opf_split(d), None, "{d}");
    }
    let e = MpoShape::opf_chain(97, 64, 11).unwrap_err().to_string();
    assert!(e.contains("97") && e.contains("no split"), "{e}");
    for k in [0, 1, 65] {
        let e = MpoShape::opf_chain(64, 64, k).unwrap_err().to_string();
        assert!(e.contains("2..=64"), "{e}");
    }
}

/// W[r, c] by multiplying the d×d slices T_k[:, i_k, j_k, :] along the chain, with r and c
/// split into their digits (i_1 most significant): the definition, independent of the
/// library's contraction.
fn naive_entry(m: &Mpo<f32>, r: usize, c: usize) -> f64 {
    let n = m.row_factors.len();
    let (mut ri, mut ci) = (vec![0; n], vec![0; n]);
    let (mut rr, mut cc) = (r, c);
    for k in (0..n).rev() {
        ri[k] = rr % m.row_factors[k];
        rr /= m.row_factors[k];
        ci[k] = cc % m.col_factors[k];
        cc /= m.col_factors[k];
    }
    let mut v = vec![1.0f64];
    for k in 0..n {
        let (dl, i, j, dr) = (
            m.bond_dims[k],
            m.row_factors[k],
            m.col_factors[k],
            m.bond_dims[k + 1],
        );
        let t = &m.cores[k];
        let mut nv = vec![0.0f64; dr];
        for a in 0..dl {
            for b in 0..dr {
                nv[b] += v[a] * t[((a * i + ri[k]) * j + ci[k]) * dr + b] as f64;
            }
        }
        v = nv;
    }
    v[0]
}

#[test]
fn exact_chain_reproduces_w() {
    // A small 11-site chain against the naive definition, every entry.
    let s = MpoShape::opf_chain(20, 12, 11).unwrap();
    assert_eq!(s.row_factors, chain(5, 9, 4));
    let w: Vec<f32> = gaussian(240, 3).iter().map(|&x| x as f32).collect();
    let m = Mpo::<f32>::decompose(&w, &s).unwrap();
    assert_eq!(m.bond_dims, s.full_bonds());
    assert_eq!(m.num_params(), s.full_params());
    for r in 0..20 {
        for c in 0..12 {
            let d = naive_entry(&m, r, c) - w[r * 12 + c] as f64;
            assert!(d.abs() < 1e-5, "({r},{c}): {d}");
        }
    }
    // MiniLM's FFN-in chain (bond 512, 3.2M parameters for 0.59M) at f32 tolerance, and
    // OPF-SVD of the same matrix.
    let w: Vec<f32> = gaussian(1536 * 384, 5).iter().map(|&x| x as f32).collect();
    for sites in [11, 2] {
        let s = MpoShape::opf_chain(1536, 384, sites).unwrap();
        let m = Mpo::<f32>::decompose(&w, &s).unwrap();
        assert_eq!(m.num_params(), s.full_params());
        let e = m.relative_error(&w).unwrap();
        assert!(e < 1e-5, "{sites} sites: relative error {e}");
        let back = m.to_matrix().unwrap();
        let worst = back
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{sites} sites: max |Δ| {worst}");
    }
}
