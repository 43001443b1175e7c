//! Admission of ready stages under CPU, memory, IO and job quotas: the pure core of the scheduler.
//!
//! **Architecture invariant:** no I/O and no processes. [`Scheduler`] only answers "which stage
//! may start now?" and is told when stages finish; the build loop does the running. That keeps the
//! rules testable with a fake runner (see the property test below): no stage starts before every
//! stage it depends on has finished successfully, and the sum of running stages' resources never
//! exceeds a quota. Ready stages are admitted in topological order with file order breaking ties;
//! a ready stage that does not fit lets later ones that do fit start (backfilling), and since a
//! stage that could never fit alone is rejected when the Pipefile is validated, nothing waits
//! forever.

use std::collections::BTreeSet;

/// How many stages may publish at once per job slot (see [`Scheduler::release`]): a publish
/// mostly waits for syncs, and a journaling filesystem commits concurrent ones together.
pub const PUBLISHING_PER_JOB: usize = 4;

/// What one stage needs while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub cpus: u32,
    pub memory_mb: u64,
    pub io: u32,
}

/// What the whole build may use at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub cpus: u32,
    /// `None`: unlimited.
    pub memory_mb: Option<u64>,
    pub io: u32,
    /// Stages running at once (`-j`).
    pub jobs: u32,
}

/// Where a stage is in the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    Running,
    /// Its processor is done and its resources are back in the pool, but it is not finished: its
    /// outputs are being published, so stages that depend on it still wait.
    Publishing,
    Succeeded,
    /// Failed, or will never run (upstream failed, build stopped).
    Failed,
}

/// The admission state of one build.
#[derive(Debug, Clone)]
pub struct Scheduler {
    order: Vec<usize>,
    upstream: Vec<Vec<usize>>,
    needs: Vec<Need>,
    capacity: Capacity,
    phase: Vec<Phase>,
    used: Need,
    running: usize,
    publishing: usize,
    /// Cores handed to running stages (for CPU pinning), by stage.
    cores: Vec<Vec<usize>>,
    free_cores: BTreeSet<usize>,
    /// Position in `order` before which no stage is waiting any more (phases only move forward),
    /// so that finding the next stage does not rescan finished ones: linear, not quadratic.
    first_waiting: std::cell::Cell<usize>,
    /// A stage failed since [`Scheduler::blocked`] last looked: only then can a waiting stage
    /// have become blocked (a scan per call would make a build quadratic in its stages, and a
    /// fan-in's list of dependencies is scanned in full each time).
    failed_since_blocked: bool,
}

impl Scheduler {
    /// `order`: the stages to build in topological order; `upstream[i]`: stage i's direct
    /// dependencies; `needs[i]`: its resources; `machine_cores`: cores available for pinning.
    pub fn new(
        order: Vec<usize>,
        upstream: Vec<Vec<usize>>,
        needs: Vec<Need>,
        capacity: Capacity,
        machine_cores: usize,
    ) -> Scheduler {
        let n = needs.len();
        let selected: BTreeSet<usize> = order.iter().copied().collect();
        // Dependencies outside the selection are not built here: they count as satisfied.
        let upstream = upstream
            .into_iter()
            .map(|deps| deps.into_iter().filter(|d| selected.contains(d)).collect())
            .collect();
        Scheduler {
            order,
            upstream,
            needs,
            capacity,
            phase: vec![Phase::Waiting; n],
            publishing: 0,
            used: Need {
                cpus: 0,
                memory_mb: 0,
                io: 0,
            },
            running: 0,
            cores: vec![Vec::new(); n],
            free_cores: (0..machine_cores).collect(),
            first_waiting: std::cell::Cell::new(0),
            failed_since_blocked: false,
        }
    }

    fn fits(&self, need: Need) -> bool {
        self.running < self.capacity.jobs as usize
            && self.used.cpus + need.cpus <= self.capacity.cpus
            && self
                .capacity
                .memory_mb
                .is_none_or(|cap| self.used.memory_mb + need.memory_mb <= cap)
            && self.used.io + need.io <= self.capacity.io
    }

    /// The position in `order` of the first waiting stage (or its length).
    fn waiting_from(&self) -> usize {
        let mut first = self.first_waiting.get();
        while first < self.order.len() && self.phase[self.order[first]] != Phase::Waiting {
            first += 1;
        }
        self.first_waiting.set(first);
        first
    }

    /// Whether every dependency of `stage` succeeded.
    pub fn ready(&self, stage: usize) -> bool {
        self.phase[stage] == Phase::Waiting
            && self.upstream[stage]
                .iter()
                .all(|&u| self.phase[u] == Phase::Succeeded)
    }

    /// The next stage that may start now, if any (it is not started until [`Scheduler::start`]).
    pub fn next(&self) -> Option<usize> {
        if self.running >= self.capacity.jobs as usize {
            return None;
        }
        self.order[self.waiting_from()..]
            .iter()
            .copied()
            .find(|&i| self.ready(i) && self.fits(self.needs[i]))
    }

    /// Marks `stage` running and reserves its resources; returns the cores it may be pinned to.
    pub fn start(&mut self, stage: usize) -> Vec<usize> {
        assert!(
            self.ready(stage) && self.fits(self.needs[stage]),
            "stage {stage} started while not admissible"
        );
        let need = self.needs[stage];
        self.phase[stage] = Phase::Running;
        self.running += 1;
        self.used.cpus += need.cpus;
        self.used.memory_mb += need.memory_mb;
        self.used.io += need.io;
        let cores: Vec<usize> = self
            .free_cores
            .iter()
            .copied()
            .take(need.cpus as usize)
            .collect();
        for c in &cores {
            self.free_cores.remove(c);
        }
        self.cores[stage] = cores.clone();
        cores
    }

    /// Marks a stage that needed no running (skipped) as succeeded without reserving anything.
    pub fn skip(&mut self, stage: usize) {
        assert!(self.ready(stage), "stage {stage} skipped while not ready");
        self.phase[stage] = Phase::Succeeded;
    }

    /// Hands back the resources of a running stage whose processor is done, while its outputs are
    /// published: the next stage's processor may start meanwhile, and stages that depend on it
    /// still wait for [`Scheduler::finish`]. At most [`PUBLISHING_PER_JOB`] × `jobs` stages
    /// publish at once; past that the stage keeps its resources until it finishes. Returns whether
    /// they were handed back.
    pub fn release(&mut self, stage: usize) -> bool {
        if self.phase[stage] != Phase::Running || self.publishing >= self.publishing_cap() {
            return false;
        }
        self.give_back(stage);
        self.publishing += 1;
        self.phase[stage] = Phase::Publishing;
        true
    }

    fn publishing_cap(&self) -> usize {
        PUBLISHING_PER_JOB * self.capacity.jobs as usize
    }

    /// Returns a running stage's resources.
    fn give_back(&mut self, stage: usize) {
        let need = self.needs[stage];
        self.running -= 1;
        self.used.cpus -= need.cpus;
        self.used.memory_mb -= need.memory_mb;
        self.used.io -= need.io;
        self.free_cores
            .extend(std::mem::take(&mut self.cores[stage]));
    }

    /// Marks `stage` finished and releases its resources (if [`Scheduler::release`] did not).
    pub fn finish(&mut self, stage: usize, succeeded: bool) {
        match self.phase[stage] {
            Phase::Running => self.give_back(stage),
            Phase::Publishing => self.publishing -= 1,
            _ => {}
        }
        self.phase[stage] = if succeeded {
            Phase::Succeeded
        } else {
            self.failed_since_blocked = true;
            Phase::Failed
        };
    }

    /// Marks every waiting stage as never to run (after a failure without `--keep-going`, or an
    /// interrupt); returns them in order.
    pub fn abandon_waiting(&mut self) -> Vec<usize> {
        let waiting: Vec<usize> = self
            .order
            .iter()
            .copied()
            .filter(|&i| self.phase[i] == Phase::Waiting)
            .collect();
        for &i in &waiting {
            self.phase[i] = Phase::Failed;
        }
        waiting
    }

    /// Waiting stages that can never run because a dependency failed; marks them failed.
    pub fn blocked(&mut self) -> Vec<(usize, usize)> {
        let mut blocked = Vec::new();
        // One pass in topological order marks the stages blocked by a stage it marks, too.
        if !std::mem::take(&mut self.failed_since_blocked) {
            return blocked;
        }
        let first = self.waiting_from();
        for &i in &self.order[first..] {
            if self.phase[i] != Phase::Waiting {
                continue;
            }
            if let Some(&u) = self.upstream[i]
                .iter()
                .find(|&&u| self.phase[u] == Phase::Failed)
            {
                blocked.push((i, u));
                self.phase[i] = Phase::Failed;
            }
        }
        blocked
    }

    /// Stages holding resources (their processors run).
    pub fn running(&self) -> usize {
        self.running
    }

    /// Stages not finished yet: running, or publishing after [`Scheduler::release`].
    pub fn unfinished(&self) -> usize {
        self.running + self.publishing
    }

    pub fn phase(&self, stage: usize) -> Phase {
        self.phase[stage]
    }

    /// Resources in use now.
    pub fn used(&self) -> Need {
        self.used
    }

    /// Whether every stage has finished (or will never run).
    pub fn done(&self) -> bool {
        // Before `waiting_from` every stage is running, publishing or finished.
        self.unfinished() == 0
            && self.order[self.waiting_from()..]
                .iter()
                .all(|&i| matches!(self.phase[i], Phase::Succeeded | Phase::Failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn need(cpus: u32, memory_mb: u64, io: u32) -> Need {
        Need {
            cpus,
            memory_mb,
            io,
        }
    }

    fn capacity(cpus: u32, memory_mb: Option<u64>, io: u32, jobs: u32) -> Capacity {
        Capacity {
            cpus,
            memory_mb,
            io,
            jobs,
        }
    }

    #[test]
    fn independent_stages_fill_the_cpu_quota_in_file_order() {
        let mut s = Scheduler::new(
            vec![0, 1, 2, 3],
            vec![vec![]; 4],
            vec![need(1, 0, 0); 4],
            capacity(2, None, 2, 8),
            2,
        );
        assert_eq!(s.next(), Some(0));
        assert_eq!(s.start(0), vec![0]);
        assert_eq!(s.next(), Some(1));
        assert_eq!(s.start(1), vec![1]);
        assert_eq!(s.next(), None, "the CPU quota is full");
        s.finish(0, true);
        assert_eq!(s.next(), Some(2));
        assert_eq!(s.start(2), vec![0], "the freed core is reused");
    }

    #[test]
    fn a_publishing_stage_frees_its_quota_but_its_dependents_wait_for_it() {
        // 0 → 1, and 2 independent; one CPU, one job at a time.
        let mut s = Scheduler::new(
            vec![0, 1, 2],
            vec![vec![], vec![0], vec![]],
            vec![need(1, 0, 1); 3],
            capacity(1, None, 1, 1),
            1,
        );
        assert_eq!(s.next(), Some(0));
        s.start(0);
        assert_eq!(s.next(), None);
        assert!(
            s.release(0),
            "its processor is done: the quota is handed back"
        );
        assert_eq!((s.running(), s.unfinished()), (0, 1));
        assert_eq!(s.next(), Some(2), "1 still waits for 0 to publish");
        s.start(2);
        assert!(s.release(2));
        s.finish(0, true);
        assert_eq!(s.next(), Some(1));
        s.start(1);
        assert!(!s.done());
        s.finish(1, true);
        assert!(!s.done(), "2 is still publishing");
        s.finish(2, true);
        assert!(s.done());
    }

    #[test]
    fn past_the_publishing_cap_a_stage_keeps_its_quota_until_it_finishes() {
        let n = PUBLISHING_PER_JOB + 2;
        let mut s = Scheduler::new(
            (0..n).collect(),
            vec![vec![]; n],
            vec![need(1, 0, 0); n],
            capacity(1, None, 1, 1),
            1,
        );
        for i in 0..PUBLISHING_PER_JOB {
            s.start(i);
            assert!(s.release(i));
        }
        let last = PUBLISHING_PER_JOB;
        s.start(last);
        assert!(!s.release(last), "the cap is reached");
        assert_eq!(s.next(), None, "it still holds the only CPU");
        s.finish(0, true);
        assert_eq!(s.next(), None);
        s.finish(last, true);
        assert_eq!(s.next(), Some(last + 1));
    }

    #[test]
    fn a_stage_waits_for_its_dependencies_and_a_failure_blocks_its_dependents() {
        let mut s = Scheduler::new(
            vec![0, 1, 2],
            vec![vec![], vec![0], vec![]],
            vec![need(1, 0, 0); 3],
            capacity(4, None, 2, 4),
            4,
        );
        assert_eq!(s.next(), Some(0));
        s.start(0);
        assert_eq!(s.next(), Some(2), "1 waits for 0");
        s.start(2);
        s.finish(0, false);
        assert_eq!(s.blocked(), vec![(1, 0)]);
        s.finish(2, true);
        assert!(s.done());
    }

    #[test]
    fn memory_and_io_and_jobs_bound_admission_and_later_stages_backfill() {
        let needs = vec![
            need(1, 700, 0),
            need(1, 700, 1),
            need(1, 200, 1),
            need(1, 100, 1),
        ];
        let mut s = Scheduler::new(
            vec![0, 1, 2, 3],
            vec![vec![]; 4],
            needs,
            capacity(4, Some(1000), 1, 3),
            4,
        );
        s.start(s.next().unwrap()); // 0: 700 MiB
        assert_eq!(s.next(), Some(2), "1 does not fit in memory; 2 backfills");
        s.start(2);
        assert_eq!(s.next(), None, "3 needs the only IO slot, which 2 holds");
        s.finish(2, true);
        assert_eq!(s.next(), Some(3));
    }

    #[test]
    fn dependencies_outside_the_selection_count_as_satisfied() {
        let s = Scheduler::new(
            vec![1],
            vec![vec![], vec![0]],
            vec![need(1, 0, 0); 2],
            capacity(1, None, 1, 1),
            1,
        );
        assert_eq!(s.next(), Some(1));
    }

    /// A random DAG (edges only from lower to higher index) with random needs that each fit alone.
    fn dag_and_needs() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<Need>, Capacity, Vec<u8>)> {
        (
            1usize..12,
            1u32..5,
            proptest::option::of(100u64..2000),
            1u32..4,
            1u32..6,
        )
            .prop_flat_map(|(n, cpus, mem, io, jobs)| {
                let edges =
                    proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n);
                let needs =
                    proptest::collection::vec((1..=cpus, 0..=mem.unwrap_or(4000), 0..=io), n);
                let choices = proptest::collection::vec(any::<u8>(), 4 * n);
                (edges, needs, Just(capacity(cpus, mem, io, jobs)), choices).prop_map(
                    move |(edges, needs, cap, choices)| {
                        let upstream = (0..n)
                            .map(|b| (0..b).filter(|&a| edges[a][b]).collect())
                            .collect();
                        let needs = needs.into_iter().map(|(c, m, i)| need(c, m, i)).collect();
                        (upstream, needs, cap, choices)
                    },
                )
            })
    }

    proptest! {
        /// With a fake runner that finishes running stages in a random order (and fails some),
        /// some after handing their resources back to publish: no stage starts before its
        /// dependencies succeeded (a publishing one has not), no quota is ever exceeded by the
        /// stages holding resources, at most `PUBLISHING_PER_JOB` × `jobs` publish at once, and
        /// the build always ends.
        #[test]
        fn quotas_and_dependencies_always_hold((upstream, needs, cap, choices) in dag_and_needs()) {
            let n = needs.len();
            let mut s = Scheduler::new((0..n).collect(), upstream.clone(), needs.clone(), cap, cap.cpus as usize);
            let mut running: Vec<usize> = Vec::new();
            let mut publishing: Vec<usize> = Vec::new();
            let mut choice = choices.into_iter().cycle();
            let mut steps = 0;
            while !s.done() {
                steps += 1;
                prop_assert!(steps < 20 * n + 10, "the build does not end");
                while let Some(i) = s.next() {
                    for &u in &upstream[i] {
                        prop_assert_eq!(s.phase(u), Phase::Succeeded, "stage {} started before {}", i, u);
                    }
                    let cores = s.start(i);
                    prop_assert_eq!(cores.len(), needs[i].cpus as usize);
                    running.push(i);
                    let used = s.used();
                    prop_assert!(used.cpus <= cap.cpus && used.io <= cap.io && s.running() <= cap.jobs as usize);
                    prop_assert!(cap.memory_mb.is_none_or(|m| used.memory_mb <= m));
                }
                s.blocked();
                if running.is_empty() && publishing.is_empty() {
                    prop_assert!(s.done(), "nothing runs, nothing can start, but the build is not done");
                    break;
                }
                prop_assert!(!s.done());
                let c = choice.next().unwrap() as usize;
                if !running.is_empty() && c.is_multiple_of(3) {
                    // A processor is done: its stage publishes with its resources handed back.
                    let i = running[c / 3 % running.len()];
                    let was_publishing = publishing.len();
                    if s.release(i) {
                        prop_assert!(was_publishing < PUBLISHING_PER_JOB * cap.jobs as usize);
                        running.retain(|&r| r != i);
                        publishing.push(i);
                        prop_assert_eq!(s.phase(i), Phase::Publishing);
                    } else {
                        prop_assert_eq!(was_publishing, PUBLISHING_PER_JOB * cap.jobs as usize);
                    }
                    prop_assert_eq!(s.running(), running.len());
                    prop_assert_eq!(s.unfinished(), running.len() + publishing.len());
                    continue;
                }
                let mut unfinished: Vec<usize> = running.iter().chain(&publishing).copied().collect();
                let finished = unfinished.remove(c % unfinished.len());
                running.retain(|&r| r != finished);
                publishing.retain(|&r| r != finished);
                s.finish(finished, !c.is_multiple_of(7));
                prop_assert_eq!(s.running(), running.len());
            }
        }
    }
}
