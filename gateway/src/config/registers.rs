//! Register-map arithmetic: which tags of one device and one area claim the
//! same registers (or bits).

use std::ops::Range;

/// A tag's claim on one area of one device: registers (or bits)
/// `start..end`, and the tag's position in the file, which decides which of
/// two overlapping tags is "the later one".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Registers or bits `start..end` (end exclusive, at most 65536).
    pub range: Range<u32>,
    /// Order of appearance in the file (smaller is earlier).
    pub order: usize,
}

/// An overlap between two claims, reported at the later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    /// Index (into the input slice) of the claim that appears later in the file.
    pub later: usize,
    /// Index of the claim it overlaps, which appears earlier in the file.
    pub earlier: usize,
}

/// Finds overlapping claims in `O(n log n)`.
///
/// Every claim that overlaps a claim starting at or before it is reported
/// exactly once, paired with the claim reaching furthest among those that
/// start before it; so each overlapping tag shows up in at least one pair.
/// Empty ranges never overlap anything.
pub fn overlaps(claims: &[Claim]) -> Vec<Overlap> {
    let mut by_start: Vec<usize> = (0..claims.len())
        .filter(|&i| !claims[i].range.is_empty())
        .collect();
    by_start.sort_by_key(|&i| (claims[i].range.start, claims[i].order));
    let mut found = Vec::new();
    // The claim, among those seen so far, whose range ends furthest.
    let mut furthest: Option<usize> = None;
    for &i in &by_start {
        if let Some(f) = furthest {
            if claims[i].range.start < claims[f].range.end {
                let (later, earlier) = if claims[i].order > claims[f].order {
                    (i, f)
                } else {
                    (f, i)
                };
                found.push(Overlap { later, earlier });
            }
            if claims[i].range.end > claims[f].range.end {
                furthest = Some(i);
            }
        } else {
            furthest = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(ranges: &[(u32, u32)]) -> Vec<Claim> {
        ranges
            .iter()
            .enumerate()
            .map(|(order, &(s, e))| Claim { range: s..e, order })
            .collect()
    }

    fn pairs(ranges: &[(u32, u32)]) -> Vec<(usize, usize)> {
        let mut v: Vec<_> = overlaps(&claims(ranges))
            .into_iter()
            .map(|o| (o.later, o.earlier))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn adjacent_ranges_do_not_overlap() {
        assert_eq!(pairs(&[(0, 2), (2, 4), (4, 5), (5, 9)]), vec![]);
    }

    #[test]
    fn intersecting_ranges_are_reported_at_the_later_tag() {
        assert_eq!(pairs(&[(0, 2), (1, 3)]), vec![(1, 0)]);
        // File order, not address order, decides which one is later.
        assert_eq!(pairs(&[(1, 3), (0, 2)]), vec![(1, 0)]);
    }

    #[test]
    fn same_start_and_containment_overlap() {
        assert_eq!(pairs(&[(10, 11), (10, 14)]), vec![(1, 0)]);
        assert_eq!(pairs(&[(0, 8), (3, 4)]), vec![(1, 0)]);
        assert_eq!(pairs(&[(3, 4), (0, 8)]), vec![(1, 0)]);
    }

    #[test]
    fn every_overlapping_claim_is_in_some_pair() {
        // 0..8 contains both 2..4 and 5..6; 20..22 is alone.
        let p = pairs(&[(0, 8), (2, 4), (20, 22), (5, 6)]);
        assert_eq!(p, vec![(1, 0), (3, 0)]);
    }

    #[test]
    fn empty_ranges_and_the_top_of_the_map() {
        assert_eq!(pairs(&[(5, 5), (4, 6)]), vec![]);
        assert_eq!(pairs(&[(65534, 65536), (65535, 65536)]), vec![(1, 0)]);
    }

    #[test]
    fn the_tank_map_has_no_overlaps() {
        // Holding registers of docs/tank-register-map.md.
        assert_eq!(
            pairs(&[
                (0, 2),
                (2, 4),
                (4, 6),
                (6, 7),
                (7, 8),
                (8, 9),
                (10, 14),
                (14, 22)
            ]),
            vec![]
        );
    }
}
