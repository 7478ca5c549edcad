//! Sets of half-open `u64` ranges, for changed blocks and byte extents.
//!
//! A [`RangeSet`] keeps disjoint, non-adjacent ranges in a `BTreeMap` from
//! start to end, merged on insert and split on remove (the shape of quinn's
//! `RangeSet`): optimised for long runs and random insert/remove/contains,
//! which is what change tracking sees (sequential writes coalesce into one
//! entry; random 4 KiB writes cost one entry each).

use std::collections::BTreeMap;
use std::ops::Range;

/// A set of `u64` values stored as disjoint, non-adjacent half-open ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RangeSet {
    /// start -> end (exclusive); invariant: for consecutive entries
    /// `a.end < b.start` (never touching), and every `start < end`.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// Whether the set holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many disjoint ranges the set holds.
    pub fn range_count(&self) -> usize {
        self.map.len()
    }

    /// How many values the set holds (the sum of the ranges' lengths).
    pub fn len(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether `value` is in the set.
    pub fn contains(&self, value: u64) -> bool {
        self.map
            .range(..=value)
            .next_back()
            .is_some_and(|(_, &end)| value < end)
    }

    /// Whether every value of `range` is in the set (true for an empty range).
    pub fn contains_range(&self, range: Range<u64>) -> bool {
        if range.start >= range.end {
            return true;
        }
        self.map
            .range(..=range.start)
            .next_back()
            .is_some_and(|(_, &end)| range.end <= end)
    }

    /// Whether any value of `range` is in the set.
    pub fn intersects(&self, range: Range<u64>) -> bool {
        if range.start >= range.end {
            return false;
        }
        // The last range starting before `range.end` is the only candidate.
        self.map
            .range(..range.end)
            .next_back()
            .is_some_and(|(_, &end)| end > range.start)
    }

    /// Add every value of `range`. Returns whether the set changed.
    pub fn insert(&mut self, range: Range<u64>) -> bool {
        let Range { mut start, mut end } = range;
        if start >= end {
            return false;
        }
        if self.contains_range(start..end) {
            return false;
        }
        // Merge with a range that starts at or before `start` and reaches it.
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.map.remove(&s);
            }
        }
        // Swallow every range starting within (or right at the end of) the new one.
        while let Some((&s, &e)) = self.map.range(start..=end).next() {
            end = end.max(e);
            self.map.remove(&s);
        }
        self.map.insert(start, end);
        true
    }

    /// Remove every value of `range`. Returns whether the set changed.
    pub fn remove(&mut self, range: Range<u64>) -> bool {
        let Range { start, end } = range;
        if start >= end || !self.intersects(start..end) {
            return false;
        }
        // A range that starts before `start` and overlaps: keep its head.
        if let Some((&s, &e)) = self.map.range(..start).next_back() {
            if e > start {
                self.map.insert(s, start);
                if e > end {
                    self.map.insert(end, e);
                    return true;
                }
            }
        }
        // Ranges starting inside: drop them, keeping a tail past `end`.
        while let Some((&s, &e)) = self.map.range(start..end).next() {
            self.map.remove(&s);
            if e > end {
                self.map.insert(end, e);
            }
        }
        true
    }

    /// Add every range of `other`.
    pub fn union_with(&mut self, other: &RangeSet) {
        for r in other.iter() {
            self.insert(r);
        }
    }

    /// Remove every range of `other`.
    pub fn subtract(&mut self, other: &RangeSet) {
        for r in other.iter() {
            self.remove(r);
        }
    }

    /// The parts of `range` that are in the set, in order.
    pub fn intersection(&self, range: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let first = self
            .map
            .range(..=range.start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(range.start);
        self.map
            .range(first..range.end.max(first))
            .filter_map(move |(&s, &e)| {
                let (s, e) = (s.max(range.start), e.min(range.end));
                (s < e).then_some(s..e)
            })
    }

    /// The ranges, in ascending order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    /// Empty the set.
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

impl FromIterator<Range<u64>> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut set = RangeSet::new();
        for r in iter {
            set.insert(r);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn inserts_merge_and_removes_split() {
        let mut s = RangeSet::new();
        assert!(s.insert(10..20));
        assert!(s.insert(30..40));
        assert!(s.insert(20..30)); // touching on both sides: one range
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..40]);
        assert!(!s.insert(15..25));
        assert!(s.remove(20..25));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..20, 25..40]);
        assert_eq!(s.len(), 25);
        assert!(s.contains(10) && !s.contains(20) && s.contains(39) && !s.contains(40));
        assert!(s.intersects(19..21) && !s.intersects(20..25));
        assert_eq!(
            s.intersection(15..30).collect::<Vec<_>>(),
            vec![15..20, 25..30]
        );
        assert!(s.remove(0..100));
        assert!(s.is_empty());
    }

    #[test]
    fn empty_ranges_change_nothing() {
        let mut s: RangeSet = std::iter::once(5..9).collect();
        assert!(!s.insert(7..7));
        assert!(!s.remove(6..6));
        assert!(s.contains_range(100..100));
        assert!(!s.intersects(6..6));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..9]);
    }

    #[test]
    fn works_at_the_top_of_the_domain() {
        let mut s = RangeSet::new();
        s.insert(u64::MAX - 10..u64::MAX);
        s.insert(0..1);
        assert!(s.contains(u64::MAX - 1));
        assert!(!s.contains(u64::MAX));
        s.remove(u64::MAX - 5..u64::MAX);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![0..1, u64::MAX - 10..u64::MAX - 5]
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(Range<u64>),
        Remove(Range<u64>),
    }

    fn small_range() -> impl Strategy<Value = Range<u64>> {
        (0u64..200, 0u64..40).prop_map(|(s, l)| s..s + l)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => small_range().prop_map(Op::Insert),
            2 => small_range().prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// The set behaves like a set of integers, and stays canonical:
        /// sorted, disjoint, never touching, never empty ranges.
        #[test]
        fn behaves_like_a_set_of_integers(ops in proptest::collection::vec(op(), 0..60), probe in small_range()) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(r) => {
                        let changed = r.clone().any(|v| !model.contains(&v));
                        prop_assert_eq!(set.insert(r.clone()), changed);
                        model.extend(r);
                    }
                    Op::Remove(r) => {
                        let changed = r.clone().any(|v| model.contains(&v));
                        prop_assert_eq!(set.remove(r.clone()), changed);
                        for v in r { model.remove(&v); }
                    }
                }
            }
            let values: BTreeSet<u64> = set.iter().flatten().collect();
            prop_assert_eq!(&values, &model);
            prop_assert_eq!(set.len(), model.len() as u64);
            let ranges: Vec<_> = set.iter().collect();
            for pair in ranges.windows(2) {
                prop_assert!(pair[0].end < pair[1].start, "not canonical: {:?}", ranges);
            }
            prop_assert!(ranges.iter().all(|r| r.start < r.end));
            for v in 0..260 {
                prop_assert_eq!(set.contains(v), model.contains(&v));
            }
            let in_probe: BTreeSet<u64> = set.intersection(probe.clone()).flatten().collect();
            let want: BTreeSet<u64> = probe.clone().filter(|v| model.contains(v)).collect();
            prop_assert_eq!(&in_probe, &want);
            prop_assert_eq!(set.intersects(probe.clone()), !want.is_empty());
            prop_assert_eq!(set.contains_range(probe.clone()), probe.clone().all(|v| model.contains(&v)));
        }

        #[test]
        fn union_and_subtract_match_the_model(a in proptest::collection::vec(small_range(), 0..20),
                                              b in proptest::collection::vec(small_range(), 0..20)) {
            let sa: RangeSet = a.iter().cloned().collect();
            let sb: RangeSet = b.iter().cloned().collect();
            let ma: BTreeSet<u64> = a.into_iter().flatten().collect();
            let mb: BTreeSet<u64> = b.into_iter().flatten().collect();
            let mut u = sa.clone();
            u.union_with(&sb);
            prop_assert_eq!(u.iter().flatten().collect::<BTreeSet<_>>(), &ma | &mb);
            let mut d = sa.clone();
            d.subtract(&sb);
            prop_assert_eq!(d.iter().flatten().collect::<BTreeSet<_>>(), &ma - &mb);
        }
    }
}
