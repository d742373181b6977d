//! Tabulation, cell rules, encoding and secondary suppression, including the property that no
//! suppressed cell is determined by the published cells and margins (checked with nalgebra's
//! rank, independently of the prime-field reduction the implementation uses).

use nalgebra::DMatrix;
use proptest::prelude::*;

use super::*;

fn levels(dims: &[usize]) -> Vec<Vec<String>> {
    dims.iter()
        .map(|&d| (0..d).map(|i| format!("l{i}")).collect())
        .collect()
}

fn layout(dims: &[usize], numeric: Vec<TableNumeric>) -> Layout {
    let by = (0..dims.len()).map(|i| format!("c{i}")).collect();
    Layout::from_parts(by, levels(dims), numeric, TableRows::Train)
}

fn wage(bins: Vec<f64>) -> TableNumeric {
    TableNumeric {
        column: "wage".into(),
        min: 0.0,
        max: 100.0,
        clip: false,
        bins,
        quantiles: vec![],
    }
}

const RULES: CellRules = CellRules {
    min_cell: 3,
    dominance_n: 1,
    dominance_k: 90.0,
};

#[test]
fn keys_round_trip_and_every_element_is_on_one_line_per_dimension() {
    let l = layout(&[2, 3, 4], vec![]);
    assert_eq!(l.elements, 3 * 4 * 5);
    for e in 0..l.elements {
        assert_eq!(l.index(&l.key(e)), e);
        assert_eq!(l.member[e].len(), 3);
    }
    assert!(!l.is_margin(l.index(&[1, 2, 3])));
    assert!(l.is_margin(l.index(&[2, 0, 0])));
    // Lines along axis 0: 4 × 5 of them, each of 3 elements ending in its total.
    let along0: Vec<_> = l.lines().iter().filter(|x| x.len() == 3).collect();
    assert_eq!(along0.len(), 20);
    assert_eq!(l.key(along0[0][2])[0], 2);
}

#[test]
fn tabulation_counts_sums_margins_and_histograms() {
    let l = layout(&[2, 2], vec![wage(vec![0.0, 50.0, 100.0])]);
    let a = [0u32, 0, 1, 1, 1];
    let b = [0u32, 1, 1, 1, 0];
    let x = [10.0, 20.0, 30.0, 60.0, 100.0];
    let sel = [true, true, true, true, false];
    let t = tabulate(&l, &[&a, &b], &[&x], &sel, 2).expect("tabulate");
    let c = |k: &[usize]| t.counts[l.index(k)];
    assert_eq!((c(&[0, 0]), c(&[0, 1]), c(&[1, 1]), c(&[1, 0])), (1, 1, 2, 0));
    assert_eq!((c(&[2, 1]), c(&[0, 2]), c(&[2, 2])), (3, 2, 4));
    let rules = CellRules {
        min_cell: 1,
        dominance_n: 2,
        dominance_k: 100.0,
    };
    let (v, suppressed) = node_answer(&l, &t, rules).expect("answer");
    assert_eq!(suppressed, 0);
    let e = l.index(&[1, 1]) * l.width;
    let o = e + l.numeric_offset(0);
    assert_eq!(&v[e..e + 2], &[0.0, 2.0]);
    assert_eq!(&v[o..o + 3], &[90.0, 4500.0, 90.0]);
    assert!((v[o + 3] - 0.81).abs() < 1e-12);
    assert_eq!(&v[o + 4..o + 6], &[1.0, 1.0]);
    let g = l.index(&[2, 2]) * l.width + l.numeric_offset(0);
    assert_eq!(v[g], 120.0);
}

#[test]
fn values_out_of_bounds_are_refused_by_column_or_clipped() {
    let l = layout(&[2], vec![wage(vec![])]);
    let a = [0u32, 1];
    let x = [10.0, 120.0];
    let err = tabulate(&l, &[&a], &[&x], &[true, true], 2).expect_err("out of bounds");
    assert_eq!(
        err,
        TableError::OutOfBounds {
            column: "wage".into()
        }
    );
    assert!(!err.to_string().contains("120"));
    let mut clipped = wage(vec![]);
    clipped.clip = true;
    let l = layout(&[2], vec![clipped]);
    let t = tabulate(&l, &[&a], &[&x], &[true, true], 2).expect("clipped");
    assert_eq!(t.acc[l.index(&[2])].sum.value(), 110.0);
}

#[test]
fn a_small_cell_and_its_complement_go_as_zeros_with_flags() {
    // Level 0 of a 1-D table has 1 row, levels 1 and 2 have 5 and 7: the margin (13) is
    // public elsewhere, so level 1 (the smaller other cell) is suppressed too.
    let l = layout(&[3], vec![]);
    let a: Vec<u32> = std::iter::once(0)
        .chain(std::iter::repeat_n(1, 5))
        .chain(std::iter::repeat_n(2, 7))
        .collect();
    let sel = vec![true; a.len()];
    let t = tabulate(&l, &[&a], &[], &sel, 1).expect("tabulate");
    let (v, suppressed) = node_answer(&l, &t, RULES).expect("answer");
    assert_eq!(suppressed, 2);
    let w = l.width;
    assert_eq!(&v[0..w], &[1.0, 0.0]);
    assert_eq!(&v[w..2 * w], &[1.0, 0.0]);
    assert_eq!(&v[2 * w..3 * w], &[0.0, 7.0]);
    assert_eq!(&v[3 * w..4 * w], &[0.0, 13.0]);
}

#[test]
fn a_dominated_cell_is_suppressed() {
    let l = layout(&[2], vec![wage(vec![])]);
    let a = [0u32, 0, 0, 0, 1, 1, 1, 1];
    let x = [100.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0];
    let t = tabulate(&l, &[&a], &[&x], &[true; 8], 1).expect("tabulate");
    let (v, _) = node_answer(&l, &t, RULES).expect("answer");
    // Cell 0 is dominated; cell 1 goes with it (the margin is known); the margin is dominated too.
    assert_eq!(v[0], 1.0);
    assert_eq!(v[l.width], 1.0);
    assert!(v[1..l.width].iter().all(|x| *x == 0.0));
}

#[test]
fn pooled_dominance_bound_refuses_one_office_and_passes_four_alike() {
    // One office holds the whole cell: refused for any k < 100.
    assert!(dominated_pooled(10.0, 1.0, 10.0, 2, 85.0));
    // Four equal offices: the bound is √(2 · 4 · ¼²) T ≈ 0.71 T.
    let q = 4.0 * (2.5f64 / 10.0).powi(2);
    assert!(!dominated_pooled(10.0, q, 10.0, 2, 85.0));
    assert!(!dominated_pooled(0.0, 0.0, 10.0, 2, 85.0));
}

#[test]
fn grouped_quantiles_interpolate_inside_the_bin() {
    let edges = [0.0, 10.0, 20.0, 40.0];
    let hist = [2.0, 4.0, 2.0];
    assert_eq!(quantile(&edges, &hist, 0.5), Some(15.0));
    assert_eq!(quantile(&edges, &hist, 0.0), Some(0.0));
    assert_eq!(quantile(&edges, &hist, 1.0), Some(40.0));
    assert_eq!(quantile(&edges, &hist, 0.25), Some(10.0));
    assert_eq!(quantile(&edges, &[0.0, 0.0, 0.0], 0.5), None);
}

/// The "bridge": two suppressed cycles joined by one suppressed cell satisfy the line rule,
/// but the joining cell is determined; the exact check suppresses more.
#[test]
fn a_bridge_between_two_cycles_is_protected() {
    let l = layout(&[4, 4], vec![]);
    let mut status = vec![None; l.elements];
    let mut size = vec![100u64; l.elements];
    for k in [
        [0, 0],
        [0, 1],
        [1, 0],
        [1, 1],
        [2, 2],
        [2, 3],
        [3, 2],
        [3, 3],
        [0, 2],
    ] {
        status[l.index(&k)] = Some(Suppression::MinCell);
        size[l.index(&k)] = 1;
    }
    assert!(!determined(&l, &unknowns(&status, &l, true))
        .expect("det")
        .is_empty());
    protect(&l, &size, &mut status, true, 3).expect("protect");
    assert_no_cell_determined(&l, &status, true);
}

fn unknowns(status: &[Option<Suppression>], l: &Layout, margins_known: bool) -> Vec<usize> {
    (0..l.elements)
        .filter(|&e| status[e].is_some() && !(margins_known && l.is_margin(e)))
        .collect()
}

/// With nalgebra: build every line equation restricted to the unknowns; a suppressed element is
/// determined when dropping its column lowers the rank (its unit vector is in the row space).
fn assert_no_cell_determined(l: &Layout, status: &[Option<Suppression>], margins_known: bool) {
    let unk = unknowns(status, l, margins_known);
    if unk.is_empty() {
        return;
    }
    let rows: Vec<&Vec<usize>> = l
        .lines()
        .iter()
        .filter(|line| line.iter().any(|e| unk.contains(e)))
        .collect();
    let a = DMatrix::from_fn(rows.len(), unk.len(), |r, c| {
        let line = rows[r];
        match line.iter().position(|e| *e == unk[c]) {
            Some(p) if p + 1 == line.len() => -1.0,
            Some(_) => 1.0,
            None => 0.0,
        }
    });
    let full = a.rank(1e-9);
    for (c, e) in unk.iter().enumerate() {
        let without = a.clone().remove_column(c).rank(1e-9);
        assert_eq!(
            without,
            full,
            "element {:?} is determined by the published cells",
            l.key(*e)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Random 2-D and 3-D tables with small cells: after pooled secondary suppression (margins
    /// are cells), and after a node's (margins known), no suppressed cell is determined.
    #[test]
    fn no_suppressed_cell_is_determined(
        dims in prop_oneof![
            prop::collection::vec(2usize..6, 2),
            prop::collection::vec(2usize..4, 3),
        ],
        seed in prop::collection::vec(0u64..40, 125),
        margins_known in any::<bool>(),
    ) {
        let l = layout(&dims, vec![]);
        let interior: Vec<usize> = (0..l.elements).filter(|&e| !l.is_margin(e)).collect();
        let mut size = vec![0u64; l.elements];
        for (i, &e) in interior.iter().enumerate() {
            // Mostly large cells, some small, some empty.
            let s = seed[i % seed.len()];
            size[e] = if s < 5 { s } else { 10 + s };
        }
        // Margins hold the sums of the cells they cover.
        for e in 0..l.elements {
            if l.is_margin(e) {
                let key = l.key(e);
                size[e] = interior
                    .iter()
                    .filter(|&&c| {
                        let ck = l.key(c);
                        ck.iter().zip(&key).zip(&dims).all(|((a, b), d)| *b == *d || a == b)
                    })
                    .map(|&c| size[c])
                    .sum();
            }
        }
        let mut status: Vec<Option<Suppression>> = size
            .iter()
            .enumerate()
            .map(|(e, &n)| {
                let candidate = !(margins_known && l.is_margin(e));
                (candidate && n > 0 && n < 10).then_some(Suppression::MinCell)
            })
            .collect();
        match protect(&l, &size, &mut status, margins_known, 10) {
            Ok(()) => assert_no_cell_determined(&l, &status, margins_known),
            // A node may refuse; the pooled table always has somewhere left to suppress.
            Err(e) => prop_assert!(margins_known, "{e}"),
        }
    }
}

/// Two small cells of 1 and 2 rows in one line satisfy "two unknowns", but the published total
/// less the published parts would release their 3 rows as a group: a third cell goes too.
#[test]
fn suppressed_parts_of_a_line_hold_min_cell_rows_together() {
    let l = layout(&[4], vec![]);
    let size = vec![1, 2, 50, 60, 113];
    let mut status = vec![None; l.elements];
    status[0] = Some(Suppression::MinCell);
    status[1] = Some(Suppression::MinCell);
    protect(&l, &size, &mut status, true, 5).expect("protect");
    assert_eq!(
        status,
        [
            Some(Suppression::MinCell),
            Some(Suppression::MinCell),
            Some(Suppression::Secondary),
            None,
            None
        ]
    );
}
