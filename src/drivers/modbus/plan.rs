//! Which requests read a device's points: as few as possible.
//!
//! Points of the same table are merged into one block when the gap between
//! them is at most `max_gap` and the block stays within `max_registers`
//! (or `max_bits`). A slow RS-485 bus spends most of its time on request
//! overhead (frame, turnaround, inter-frame silence), so reading a few
//! unused registers is much cheaper than another request.
//!
//! Some devices answer a block that touches an address they do not have
//! with an exception, although every configured point is readable. The
//! [`Plan`] therefore remembers, per point, how freely it may be merged:
//! a block that fails is re-planned without gaps ([`Merge::Tight`]), and if
//! that fails too, point by point ([`Merge::Solo`]). A single point that
//! still fails is the bad one ([`Merge::Bad`]): it is read alone from then
//! on, and the points that were split apart with it may merge again around
//! it. The others keep reporting.

use crate::config::{DeviceConfig, Table};

use super::point::{is_bit_table, Point};

/// Default largest gap bridged by one read.
pub const DEFAULT_MAX_GAP: u16 = 8;
/// Protocol limit for FC 03/04 (and the default).
pub const MAX_REGISTERS: u16 = 125;
/// Protocol limit for FC 01/02 (and the default).
pub const MAX_BITS: u16 = 2000;

/// Request size limits of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest gap (registers, or bits in bit tables) merged into a block.
    pub max_gap: u16,
    pub max_registers: u16,
    pub max_bits: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_gap: DEFAULT_MAX_GAP,
            max_registers: MAX_REGISTERS,
            max_bits: MAX_BITS,
        }
    }
}

impl Limits {
    pub fn from_device(d: &DeviceConfig) -> Limits {
        Limits {
            max_gap: d.max_gap.unwrap_or(DEFAULT_MAX_GAP),
            max_registers: d
                .max_registers
                .unwrap_or(MAX_REGISTERS)
                .clamp(1, MAX_REGISTERS),
            max_bits: d.max_bits.unwrap_or(MAX_BITS).clamp(1, MAX_BITS),
        }
    }

    fn max(&self, table: Table) -> u32 {
        if is_bit_table(table) {
            self.max_bits.into()
        } else {
            self.max_registers.into()
        }
    }
}

/// How freely a point may share a request, from most to least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Merge {
    /// Merged across gaps up to `max_gap`.
    Normal,
    /// Was in a block that got an exception: merged only with adjacent
    /// points, no gaps.
    Tight,
    /// Read on its own.
    Solo,
    /// Answered an exception on its own: read alone (and reported bad);
    /// no block spans it.
    Bad,
}

/// The place of one point: table, first address, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub table: Table,
    pub start: u16,
    pub len: u16,
}

impl Span {
    pub fn of(p: &Point) -> Span {
        Span {
            table: p.table,
            start: p.address,
            len: p.span(),
        }
    }

    fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.len)
    }
}

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub table: Table,
    pub start: u16,
    pub count: u16,
    /// Indices into the device's points.
    pub points: Vec<usize>,
    pub merge: Merge,
}

impl Block {
    /// Offset of a point's first register (or bit) in this block's data.
    pub fn offset_of(&self, span: &Span) -> usize {
        usize::from(span.start.saturating_sub(self.start))
    }
}

/// Merges `points` (index, span, merge level) into as few blocks as the
/// limits allow. Blocks come out ordered by table and address.
pub fn coalesce(points: &[(usize, Span, Merge)], limits: &Limits) -> Vec<Block> {
    let mut sorted: Vec<&(usize, Span, Merge)> = points.iter().collect();
    sorted.sort_by_key(|(i, s, _)| (table_rank(s.table), s.start, s.len, *i));
    let mut blocks: Vec<Block> = Vec::new();
    // The open block and its end (exclusive, u32 so 65535+1 fits).
    let mut open: Option<(Block, u32)> = None;
    for &&(index, span, merge) in &sorted {
        if let Some((block, end)) = open.as_mut() {
            let fits = block.table == span.table
                && block.merge == merge
                && matches!(merge, Merge::Normal | Merge::Tight)
                && gap(*end, span) <= allowed_gap(merge, limits)
                && (*end).max(span.end()) - u32::from(block.start) <= limits.max(span.table);
            if fits {
                *end = (*end).max(span.end());
                block.count = (*end - u32::from(block.start)) as u16;
                block.points.push(index);
                continue;
            }
        }
        if let Some((block, _)) = open.take() {
            blocks.push(block);
        }
        open = Some((
            Block {
                table: span.table,
                start: span.start,
                count: span.len,
                points: vec![index],
                merge,
            },
            span.end(),
        ));
    }
    if let Some((block, _)) = open {
        blocks.push(block);
    }
    blocks
}

fn gap(end: u32, next: Span) -> u32 {
    u32::from(next.start).saturating_sub(end)
}

fn allowed_gap(merge: Merge, limits: &Limits) -> u32 {
    match merge {
        Merge::Normal => limits.max_gap.into(),
        Merge::Tight | Merge::Solo | Merge::Bad => 0,
    }
}

fn table_rank(t: Table) -> u8 {
    match t {
        Table::Coil => 0,
        Table::Discrete => 1,
        Table::Input => 2,
        Table::Holding => 3,
    }
}

/// The requests of one device, with what it learned from exceptions.
#[derive(Debug, Clone)]
pub struct Plan {
    spans: Vec<Span>,
    merge: Vec<Merge>,
    limits: Limits,
    blocks: Vec<Block>,
    /// Points split into solo reads together, until one of them turns out
    /// to be the bad one.
    solo_groups: Vec<Vec<usize>>,
}

impl Plan {
    pub fn new(spans: Vec<Span>, limits: Limits) -> Plan {
        let merge = vec![Merge::Normal; spans.len()];
        let mut plan = Plan {
            spans,
            merge,
            limits,
            blocks: Vec::new(),
            solo_groups: Vec::new(),
        };
        plan.blocks = plan.coalesce_where(|_| true);
        plan
    }

    pub fn for_points(points: &[Point], limits: Limits) -> Plan {
        Plan::new(points.iter().map(Span::of).collect(), limits)
    }

    /// The requests of one poll.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub fn span(&self, point: usize) -> Option<&Span> {
        self.spans.get(point)
    }

    pub fn merge_of(&self, point: usize) -> Option<Merge> {
        self.merge.get(point).copied()
    }

    /// `block` was answered with an exception. Returns the smaller blocks
    /// to read its points with instead (the plan remembers them for later
    /// polls), or an empty list when `block` is a single point read on its
    /// own: that point is the bad one.
    pub fn split(&mut self, block: &Block) -> Vec<Block> {
        let single = block.points.iter().all(|&i| {
            block
                .points
                .first()
                .is_some_and(|&f| self.spans.get(f) == self.spans.get(i))
        });
        if matches!(block.merge, Merge::Solo | Merge::Bad) || single {
            self.set_merge(&block.points, Merge::Bad);
            self.release_siblings(&block.points);
            self.blocks = self.coalesce_where(|_| true);
            return Vec::new();
        }
        let mut next = if block.merge == Merge::Normal {
            Merge::Tight
        } else {
            Merge::Solo
        };
        self.set_merge(&block.points, next);
        let mut parts = self.coalesce_where(|i| block.points.contains(&i));
        if next == Merge::Tight && parts.len() == 1 {
            // Without gaps it is the same request: go point by point.
            next = Merge::Solo;
            self.set_merge(&block.points, next);
            parts = self.coalesce_where(|i| block.points.contains(&i));
        }
        if next == Merge::Solo {
            self.solo_groups.push(block.points.clone());
        }
        self.blocks = self.coalesce_where(|_| true);
        parts
    }

    /// `bad` are known bad now: the points that were split into solo reads
    /// together with them may merge (without gaps) again, since blocks
    /// never span a bad point. Happens once per group, so a group that
    /// fails again for another reason stays solo.
    fn release_siblings(&mut self, bad: &[usize]) {
        let (hit, keep): (Vec<Vec<usize>>, Vec<Vec<usize>>) = std::mem::take(&mut self.solo_groups)
            .into_iter()
            .partition(|g| g.iter().any(|i| bad.contains(i)));
        self.solo_groups = keep;
        for i in hit.into_iter().flatten() {
            if let Some(m) = self.merge.get_mut(i) {
                if *m == Merge::Solo {
                    *m = Merge::Tight;
                }
            }
        }
    }

    fn set_merge(&mut self, points: &[usize], m: Merge) {
        for &i in points {
            if let Some(slot) = self.merge.get_mut(i) {
                *slot = m;
            }
        }
    }

    fn coalesce_where(&self, keep: impl Fn(usize) -> bool) -> Vec<Block> {
        let entries: Vec<(usize, Span, Merge)> = self
            .spans
            .iter()
            .zip(&self.merge)
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(i, (s, m))| (i, *s, *m))
            .collect();
        coalesce(&entries, &self.limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(start: u16, len: u16) -> Span {
        Span {
            table: Table::Holding,
            start,
            len,
        }
    }

    fn limits(max_gap: u16, max_registers: u16) -> Limits {
        Limits {
            max_gap,
            max_registers,
            max_bits: 2000,
        }
    }

    fn ranges(blocks: &[Block]) -> Vec<(u16, u16)> {
        blocks.iter().map(|b| (b.start, b.count)).collect()
    }

    #[test]
    fn adjacent_and_small_gaps_merge() {
        // 0:f32, 2:u16, 10:u16 (gap 7), 30:u32 (gap 19)
        let plan = Plan::new(
            vec![reg(0, 2), reg(2, 1), reg(10, 1), reg(30, 2)],
            Limits::default(),
        );
        assert_eq!(ranges(plan.blocks()), vec![(0, 11), (30, 2)]);
        assert_eq!(plan.blocks()[0].points, vec![0, 1, 2]);
    }

    #[test]
    fn gap_exactly_max_gap_merges_one_more_does_not() {
        let l = limits(8, 125);
        let merged = Plan::new(vec![reg(0, 1), reg(9, 1)], l); // gap 8
        assert_eq!(merged.blocks().len(), 1);
        let split = Plan::new(vec![reg(0, 1), reg(10, 1)], l); // gap 9
        assert_eq!(split.blocks().len(), 2);
        let no_gaps = Plan::new(vec![reg(0, 1), reg(2, 1), reg(3, 1)], limits(0, 125));
        assert_eq!(ranges(no_gaps.blocks()), vec![(0, 1), (2, 2)]);
    }

    #[test]
    fn max_registers_caps_a_block() {
        // 300 contiguous u16 at max 125: 125 + 125 + 50.
        let spans: Vec<Span> = (0..300).map(|a| reg(a, 1)).collect();
        let plan = Plan::new(spans.clone(), Limits::default());
        assert_eq!(ranges(plan.blocks()), vec![(0, 125), (125, 125), (250, 50)]);
        // A device that accepts only 16 registers.
        let plan = Plan::new(spans, limits(8, 16));
        assert_eq!(plan.blocks().len(), 19); // ceil(300 / 16)
                                             // A value never straddles two blocks: 4 f32 with max 5 registers.
        let plan = Plan::new(
            vec![reg(0, 2), reg(2, 2), reg(4, 2), reg(6, 2)],
            limits(8, 5),
        );
        assert_eq!(ranges(plan.blocks()), vec![(0, 4), (4, 4)]);
    }

    #[test]
    fn scattered_points_optimal_count() {
        // Typical meter map: the optimum for max_gap 8 is 4 requests.
        let spans = vec![
            reg(0, 2),   // voltage f32
            reg(6, 2),   // current f32 (gap 4)
            reg(12, 2),  // power f32 (gap 4)
            reg(40, 4),  // energy u64 (gap 26)
            reg(50, 1),  // gap 6 -> same block
            reg(200, 8), // string
            Span {
                table: Table::Input,
                start: 0,
                len: 1,
            },
            Span {
                table: Table::Input,
                start: 3,
                len: 2,
            },
        ];
        let plan = Plan::new(spans.clone(), Limits::default());
        assert_eq!(plan.blocks().len(), 4);
        // Without gaps every separate range is its own request.
        assert_eq!(Plan::new(spans, limits(0, 125)).blocks().len(), 8);
    }

    #[test]
    fn tables_never_mix_and_bits_use_max_bits() {
        let bit = |t, a| Span {
            table: t,
            start: a,
            len: 1,
        };
        let spans = vec![
            bit(Table::Coil, 0),
            bit(Table::Coil, 5),
            bit(Table::Discrete, 1),
            reg(1, 1),
            Span {
                table: Table::Input,
                start: 1,
                len: 1,
            },
        ];
        let plan = Plan::new(spans, Limits::default());
        let tables: Vec<Table> = plan.blocks().iter().map(|b| b.table).collect();
        assert_eq!(
            tables,
            vec![Table::Coil, Table::Discrete, Table::Input, Table::Holding]
        );
        let coils: Vec<Span> = (0..2500).map(|a| bit(Table::Coil, a)).collect();
        let plan = Plan::new(coils, Limits::default());
        assert_eq!(ranges(plan.blocks()), vec![(0, 2000), (2000, 500)]);
    }

    #[test]
    fn bit_points_of_one_register_share_it() {
        let plan = Plan::new(vec![reg(7, 1), reg(7, 1), reg(8, 1)], Limits::default());
        assert_eq!(ranges(plan.blocks()), vec![(7, 2)]);
        assert_eq!(plan.blocks()[0].offset_of(&reg(8, 1)), 1);
    }

    #[test]
    fn top_of_address_space() {
        let plan = Plan::new(vec![reg(65533, 2), reg(65535, 1)], Limits::default());
        assert_eq!(ranges(plan.blocks()), vec![(65533, 3)]);
    }

    #[test]
    fn exception_on_a_gap_splits_without_gaps() {
        // Points at 0 and 5; register 3 does not exist on the device.
        let mut plan = Plan::new(vec![reg(0, 2), reg(5, 1)], Limits::default());
        let block = plan.blocks()[0].clone();
        assert_eq!((block.start, block.count), (0, 6));
        let parts = plan.split(&block);
        assert_eq!(ranges(&parts), vec![(0, 2), (5, 1)]);
        assert!(parts.iter().all(|b| b.merge == Merge::Tight));
        // Both parts answer: the plan keeps them (2 requests per poll).
        assert_eq!(ranges(plan.blocks()), vec![(0, 2), (5, 1)]);
    }

    #[test]
    fn exception_on_a_point_isolates_it_and_keeps_the_rest_merged() {
        // 0..=9 u16 plus 15; register 4 is bad. One block first.
        let mut spans: Vec<Span> = (0..10).map(|a| reg(a, 1)).collect();
        spans.push(reg(15, 1));
        spans.push(reg(60, 1));
        let mut plan = Plan::new(spans, Limits::default());
        assert_eq!(ranges(plan.blocks()), vec![(0, 16), (60, 1)]);
        // Poll 1: the big block fails; without gaps it is 0..10 and 15.
        let parts = plan.split(&plan.blocks()[0].clone());
        assert_eq!(ranges(&parts), vec![(0, 10), (15, 1)]);
        // 0..10 fails again: point by point.
        let parts = plan.split(&parts[0]);
        assert_eq!(parts.len(), 10);
        assert!(parts.iter().all(|b| b.merge == Merge::Solo && b.count == 1));
        // Only the single block at 4 fails: it is the bad point.
        let bad = parts.iter().find(|b| b.start == 4).unwrap().clone();
        assert!(plan.split(&bad).is_empty());
        assert_eq!(plan.merge_of(4), Some(Merge::Bad));
        // From now on: 0..4, the bad 4 alone, 5..10, 15, and the untouched
        // block at 60: the bad point hides nothing.
        assert_eq!(
            ranges(plan.blocks()),
            vec![(0, 4), (4, 1), (5, 5), (15, 1), (60, 1)]
        );
        // If 0..4 still fails as a block, its points stay solo for good.
        let parts = plan.split(&plan.blocks()[0].clone());
        assert_eq!(parts.len(), 4);
        assert_eq!(plan.blocks().len(), 8);
    }

    #[test]
    fn contiguous_block_goes_straight_to_solo() {
        // Without gaps the block would be the same request: skip that step.
        let mut plan = Plan::new(vec![reg(0, 1), reg(1, 1), reg(2, 1)], Limits::default());
        let parts = plan.split(&plan.blocks()[0].clone());
        assert_eq!(ranges(&parts), vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(plan.blocks().len(), 3);
        // The middle one is bad: the others cannot merge around it.
        assert!(plan.split(&parts[1]).is_empty());
        assert_eq!(ranges(plan.blocks()), vec![(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn good_neighbours_of_a_bad_point_merge_again() {
        // 58..62 contiguous, 60 bad: 58 and 59 read together afterwards.
        let mut plan = Plan::new((58..62).map(|a| reg(a, 1)).collect(), Limits::default());
        let parts = plan.split(&plan.blocks()[0].clone());
        assert_eq!(parts.len(), 4);
        assert!(plan.split(&parts[2]).is_empty());
        assert_eq!(ranges(plan.blocks()), vec![(58, 2), (60, 1), (61, 1)]);
    }

    #[test]
    fn single_point_exception_marks_it_bad() {
        let mut plan = Plan::new(vec![reg(0, 2), reg(100, 1)], Limits::default());
        let b = plan.blocks()[1].clone();
        assert!(plan.split(&b).is_empty());
        assert_eq!(plan.merge_of(1), Some(Merge::Bad));
        assert_eq!(plan.blocks().len(), 2);
    }

    #[test]
    fn solo_points_are_not_bridged_by_normal_blocks() {
        let mut plan = Plan::new(vec![reg(0, 1), reg(2, 1), reg(4, 1)], limits(8, 125));
        // Make the middle one solo by failing it on its own.
        plan.split(&Block {
            table: Table::Holding,
            start: 2,
            count: 1,
            points: vec![1],
            merge: Merge::Normal,
        });
        assert_eq!(ranges(plan.blocks()), vec![(0, 1), (2, 1), (4, 1)]);
    }
}
