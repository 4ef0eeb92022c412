//! Bond dimensions and parameter counts against the methods.md §0 table, padding, presets and
//! the automatic factorization.

use mpo::{factor_or_pad, preset, MpoShape};
use proptest::prelude::*;

mod common;

fn interior(b: &[usize]) -> Vec<usize> {
    b[1..b.len() - 1].to_vec()
}

fn central_share(s: &MpoShape) -> f64 {
    let b = s.full_bonds();
    let c = s.central_index();
    s.core_shape(&b, c).iter().product::<usize>() as f64 / s.full_params() as f64
}

#[test]
fn balanced_768() {
    let s = preset("balanced-768x768").unwrap();
    assert_eq!(s.row_factors, vec![3, 4, 4, 4, 4]);
    assert_eq!(s.col_factors, vec![4, 4, 4, 4, 3]);
    assert_eq!(interior(&s.full_bonds()), vec![12, 192, 192, 12]);
    assert_eq!(s.full_params(), 663_840);
    assert_eq!(s.dense_params(), 589_824);
    assert!((central_share(&s) - 0.889).abs() < 5e-4);
    assert_eq!(MpoShape::auto(768, 768, 5).unwrap(), s);
}

#[test]
fn albert_768() {
    let s = preset("albert-768x768").unwrap();
    assert_eq!(interior(&s.full_bonds()), vec![16, 256, 144, 9]);
    assert_eq!(s.full_params(), 676_433);
    assert!((central_share(&s) - 0.872).abs() < 5e-4);
}

#[test]
fn ffn_3072x768_and_transpose() {
    let s = preset("ffn-in-3072x768").unwrap();
    assert_eq!((s.rows(), s.cols()), (3072, 768));
    assert_eq!(interior(&s.full_bonds()), vec![12, 192, 384, 16]);
    assert_eq!(s.full_params(), 2_544_016);
    assert_eq!(s.dense_params(), 2_359_296);
    assert!((central_share(&s) - 0.927).abs() < 5e-4);
    let t = preset("ffn-out-768x3072").unwrap();
    assert_eq!(t, s.transposed());
    assert_eq!(t.full_params(), 2_544_016);
}

#[test]
fn albert_embedding_30000x128() {
    let s = preset("albert-emb-30000x128").unwrap();
    assert_eq!((s.rows(), s.cols()), (30000, 128));
    assert_eq!(interior(&s.full_bonds()), vec![10, 200, 480, 12]);
    assert_eq!(s.full_params(), 4_110_644);
    assert_eq!(format!("{:.2}M", s.full_params() as f64 / 1e6), "4.11M");
    assert_eq!(s.dense_params(), 3_840_000);
    assert!((central_share(&s) - 0.934).abs() < 5e-4);
}

#[test]
fn bert_embedding_is_padded() {
    let s = preset("bert-emb-30522x768").unwrap();
    assert_eq!((s.rows(), s.orig_rows), (30720, 30522));
    assert!(s.is_padded());
    assert_eq!(interior(&s.full_bonds()), vec![24, 768, 768, 24]);
    assert_eq!(factor_or_pad(30522, 5), (30720, vec![6, 8, 8, 8, 10]));
    let auto = MpoShape::auto(30522, 768, 5).unwrap();
    assert_eq!(auto.rows(), 30720);
    let t5 = preset("t5-emb-32128x768").unwrap();
    assert_eq!((t5.rows(), t5.orig_rows), (32768, 32128));
}

#[test]
fn opf_chains() {
    let ffn = preset("opf-bert-base-ffn-3072x768").unwrap();
    assert_eq!(ffn.n(), 11);
    assert_eq!(ffn.full_params(), 15_630_336);
    assert!(interior(&ffn.full_bonds()).iter().all(|&d| d == 1152));
    let att = preset("opf-bert-base-attn-768x768").unwrap();
    assert_eq!(att.full_params(), 3_907_584);
    assert!(interior(&att.full_bonds()).iter().all(|&d| d == 576));
    assert!((ffn.full_params() as f64 / ffn.dense_params() as f64 - 6.6).abs() < 0.05);
    let f15 = preset("opf-15site-768x768").unwrap();
    assert!((f15.full_params() as f64 / 589_824.0 - 8.9).abs() < 0.05);
    let bart = preset("opf-bart-768x768").unwrap();
    assert!((bart.full_params() as f64 / 589_824.0 - 1.25).abs() < 0.01);
    let small = preset("opf-bert-small-ffn-2048x512").unwrap();
    assert_eq!((small.rows(), small.cols()), (2048, 512));
}

#[test]
fn mpobert_site_counts() {
    for n in [2, 3, 5, 7, 9] {
        let f = mpo::table_factors(768, n).unwrap();
        assert_eq!(f.len(), n);
        assert_eq!(f.iter().product::<usize>(), 768);
        let s = MpoShape::from_table_or_auto(768, 768, n).unwrap();
        assert_eq!(s.n(), n);
    }
    for n in [2, 3, 5] {
        assert_eq!(
            mpo::table_factors(3072, n)
                .unwrap()
                .iter()
                .product::<usize>(),
            3072
        );
    }
    for name in [
        "mpobert-768x768-n2",
        "mpobert-768x768-n3",
        "mpobert-768x768-n7",
        "mpobert-768x768-n9",
    ] {
        assert_eq!(preset(name).unwrap().rows(), 768);
    }
}

#[test]
fn capped_bonds_and_budget() {
    let s = preset("albert-emb-30000x128").unwrap();
    assert_eq!(interior(&s.capped_bonds(240)), vec![10, 200, 240, 12]);
    let d = s.max_bond_for_params(s.dense_params() / 2);
    assert!(s.params_for(&s.capped_bonds(d)) <= s.dense_params() / 2);
    assert!(s.params_for(&s.capped_bonds(d + 1)) > s.dense_params() / 2);
}

proptest! {
    #![proptest_config(common::config(64))]

    /// Any (I, J, n) gets a valid shape whose padded size is close to the original and whose
    /// exact bonds are min(left, right).
    #[test]
    fn auto_factorization_is_valid(rows in 1usize..5000, cols in 1usize..5000, n in 1usize..8) {
        let s = MpoShape::auto(rows, cols, n).unwrap();
        prop_assert_eq!(s.n(), n);
        prop_assert!(s.rows() >= rows && s.cols() >= cols);
        // padding stays modest: next 2·3·5-smooth size is within a few percent for these sizes
        prop_assert!(s.rows() as f64 <= rows as f64 * 1.35 + 16.0);
        prop_assert!(s.cols() as f64 <= cols as f64 * 1.35 + 16.0);
        let b = s.full_bonds();
        let m = s.local_dims();
        for k in 0..=n {
            let l: usize = m[..k].iter().product();
            let r: usize = m[k..].iter().product();
            prop_assert_eq!(b[k], l.min(r));
        }
        s.check_bonds(&b).unwrap();
    }
}
