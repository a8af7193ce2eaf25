//! Node-level liveness, and the elections and heartbeats of quiet groups.
//!
//! openraft gives every group its own ticker: a wake-up every fifth of a heartbeat interval and a
//! heartbeat to each follower every interval, whether the group has work or not. With 64+ groups
//! per node that is thousands of wake-ups and hundreds of RPCs a second doing nothing. So the
//! groups here run with openraft's ticker off, and one loop per node does their timing instead:
//!
//! - every `beat` interval one node of each pair sends the other one [`Beat`]: its incarnation
//!   and the groups it leads (with their terms); the reply is the peer's own beat, so one call
//!   tells both. Which of the two calls is fixed per pair ([`initiates`]), spreading the calls
//!   evenly; the other calls too only when no beat has come from its peer for 1.5 intervals
//!   (the caller is down, or does not yet know it shares a group);
//! - a voter stands for election (Pre-Vote first) only when the group's leader is gone: its node
//!   has been silent for `dead_after`, or it is alive but has not claimed the group for that long,
//!   or there is no leader at all. Live voters go in a fixed order per group (rendezvous), a
//!   beat apart, so two rarely stand at once. A leader that started a leadership transfer no
//!   longer claims the group (openraft refuses its writes until it steps down), so if the
//!   transfer's target never takes over, the followers elect another leader;
//! - a leader sends its followers a raft heartbeat only when it has a reason: a peer came back
//!   (silent, then heard; or restarted: new incarnation), another node claims the group at a
//!   higher term (the heartbeat makes this one step down), or a slow sweep comes due.
//!
//! Architecture Invariant: this module decides only *when* to run an election or a heartbeat;
//! raft's own rules (votes, leases, terms) still decide who wins and what commits, so a wrong
//! liveness guess costs time, never safety.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::types::{GroupId, NodeId};

/// What one node tells another every beat interval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// Random per process start: a new value means the peer restarted.
    pub incarnation: u64,
    /// `(group, term)` of every group the sender leads.
    pub leads: Vec<(GroupId, u64)>,
}

/// What this node last heard from one peer.
#[derive(Clone, Debug)]
pub struct PeerView {
    pub heard: Instant,
    pub incarnation: u64,
    pub leads: BTreeMap<GroupId, u64>,
}

/// The timing every decision uses.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Interval between beats and between decisions.
    pub beat: Duration,
    /// A peer silent this long is taken for dead.
    pub dead_after: Duration,
    /// How often a leader sends each group's followers a heartbeat when nothing else does.
    pub sweep: Duration,
}

/// The peers this node hears from.
#[derive(Debug)]
pub struct Liveness {
    incarnation: u64,
    peers: Mutex<Peers>,
}

#[derive(Debug, Default)]
struct Peers {
    views: BTreeMap<NodeId, PeerView>,
    /// Peers heard again after silence or a restart, not yet acted on.
    revived: BTreeSet<NodeId>,
    /// When each peer last sent a beat of its own (not a reply to ours).
    asked: BTreeMap<NodeId, Instant>,
}

/// Which node of a pair sends the beats (the other answers): the lower id when the ids' sum is
/// even, else the higher, so each node calls about half its peers.
pub fn initiates(me: NodeId, peer: NodeId) -> bool {
    (me < peer) == me.wrapping_add(peer).is_multiple_of(2)
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness {
            incarnation: rand::random(),
            peers: Mutex::new(Peers::default()),
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Records a beat from `peer` (a request it sent, or its reply to ours).
    pub fn heard(&self, peer: NodeId, beat: Beat, now: Instant, dead_after: Duration) {
        let mut peers = self.peers.lock().expect("liveness lock");
        let revived = match peers.views.get(&peer) {
            Some(v) => {
                v.incarnation != beat.incarnation
                    || now.saturating_duration_since(v.heard) >= dead_after
            }
            None => true,
        };
        if revived {
            peers.revived.insert(peer);
        }
        peers.views.insert(
            peer,
            PeerView {
                heard: now,
                incarnation: beat.incarnation,
                leads: beat.leads.into_iter().collect(),
            },
        );
    }

    /// Records a beat `peer` sent of its own accord (and is answered with ours).
    pub fn asked(&self, peer: NodeId, beat: Beat, now: Instant, dead_after: Duration) {
        self.heard(peer, beat, now, dead_after);
        let mut peers = self.peers.lock().expect("liveness lock");
        peers.asked.insert(peer, now);
    }

    /// Whether this node should send `peer` a beat at `now`: it is the pair's caller, or the
    /// caller's beats stopped coming for 1.5 intervals.
    pub fn should_call(&self, me: NodeId, peer: NodeId, now: Instant, beat: Duration) -> bool {
        if initiates(me, peer) {
            return true;
        }
        let peers = self.peers.lock().expect("liveness lock");
        peers
            .asked
            .get(&peer)
            .is_none_or(|at| now.saturating_duration_since(*at) >= beat * 3 / 2)
    }

    /// A copy of every peer's view, and the peers revived since the last call.
    pub fn take(&self) -> (BTreeMap<NodeId, PeerView>, BTreeSet<NodeId>) {
        let mut peers = self.peers.lock().expect("liveness lock");
        let revived = std::mem::take(&mut peers.revived);
        (peers.views.clone(), revived)
    }

    /// Whether `node`'s last beat arrived less than `within` ago.
    pub fn heard_within(&self, node: NodeId, within: Duration) -> bool {
        let peers = self.peers.lock().expect("liveness lock");
        peers
            .views
            .get(&node)
            .is_some_and(|v| v.heard.elapsed() < within)
    }

    /// Whether `node` was heard from within `dead_after`.
    pub fn is_alive(
        views: &BTreeMap<NodeId, PeerView>,
        node: NodeId,
        now: Instant,
        t: &Timing,
    ) -> bool {
        views
            .get(&node)
            .is_some_and(|v| now.saturating_duration_since(v.heard) < t.dead_after)
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new()
    }
}

/// One group as this node sees it, read from its raft metrics.
#[derive(Clone, Debug)]
pub struct GroupView {
    pub group: GroupId,
    pub leading: bool,
    pub candidate: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub voters: Vec<NodeId>,
    /// Voters and learners.
    pub members: Vec<NodeId>,
}

/// What this node remembers per group between decisions.
#[derive(Clone, Debug)]
pub struct Memo {
    /// Since when the group has seemed leaderless (while its leader's node is alive).
    suspect_since: Option<Instant>,
    /// Not before this instant may this node stand again.
    next_stand: Instant,
    /// When the next sweep heartbeat is due, while leading.
    next_sweep: Option<Instant>,
}

impl Memo {
    pub fn new(now: Instant) -> Memo {
        Memo {
            suspect_since: None,
            next_stand: now,
            next_sweep: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Stand for election (with Pre-Vote when other voters exist).
    Stand,
    /// Send the followers a heartbeat now.
    Heartbeat,
}

/// The decision for one group. `jitter` in [0, 1) spreads repeated stands; `rank_order` is the
/// group's fixed voter order (best first).
#[allow(clippy::too_many_arguments)]
pub fn decide(
    me: NodeId,
    g: &GroupView,
    rank_order: &[NodeId],
    views: &BTreeMap<NodeId, PeerView>,
    revived: &BTreeSet<NodeId>,
    memo: &mut Memo,
    now: Instant,
    t: &Timing,
    jitter: f64,
) -> Action {
    let alive = |n: NodeId| n == me || Liveness::is_alive(views, n, now, t);
    if g.leading {
        memo.suspect_since = None;
        let claimed_higher = views
            .iter()
            .any(|(n, v)| alive(*n) && v.leads.get(&g.group).is_some_and(|term| *term > g.term));
        let follower_back = g.members.iter().any(|n| *n != me && revived.contains(n));
        let sweep_due = match memo.next_sweep {
            Some(at) => now >= at,
            None => {
                // Spread the groups' sweeps over the whole period.
                let offset = t.sweep.mul_f64(((g.group % 64) as f64) / 64.0);
                memo.next_sweep = Some(now + offset);
                false
            }
        };
        if claimed_higher || follower_back || sweep_due {
            memo.next_sweep = Some(now + t.sweep);
            return Action::Heartbeat;
        }
        return Action::Nothing;
    }
    memo.next_sweep = None;
    if !g.voters.contains(&me) {
        memo.suspect_since = None;
        return Action::Nothing;
    }
    // Whom this node follows: its raft view, else a live voter that claims the group at a
    // term not below ours (a restarted node does not know its leader until it hears from it).
    let leader = g.leader.filter(|l| *l != me).or_else(|| {
        views
            .iter()
            .filter(|(n, v)| {
                g.voters.contains(n)
                    && alive(**n)
                    && v.leads.get(&g.group).is_some_and(|term| *term >= g.term)
            })
            .map(|(n, _)| *n)
            .next()
    });
    let eligible_from = match leader {
        Some(l) => match views.get(&l) {
            Some(v) if alive(l) => {
                if v.leads.get(&g.group).is_some_and(|term| *term >= g.term) {
                    memo.suspect_since = None;
                    return Action::Nothing;
                }
                // Alive but not (yet) claiming the group: give it a while.
                *memo.suspect_since.get_or_insert(now) + t.dead_after
            }
            Some(v) => v.heard + t.dead_after,
            None => *memo.suspect_since.get_or_insert(now) + t.dead_after,
        },
        None => *memo.suspect_since.get_or_insert(now),
    };
    let live: Vec<NodeId> = rank_order.iter().copied().filter(|n| alive(*n)).collect();
    let rank = live.iter().position(|n| *n == me).unwrap_or(live.len()) as u32;
    if now < eligible_from + t.beat * rank || now < memo.next_stand {
        return Action::Nothing;
    }
    // A stand refused at once (our own lease still runs) costs nothing, so retry soon; a
    // candidate that got no answer waits longer, with jitter so two stop colliding.
    let wait = if g.candidate { t.dead_after } else { t.beat };
    memo.next_stand = now + wait.mul_f64(1.0 + jitter);
    Action::Stand
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            beat: Duration::from_millis(200),
            dead_after: Duration::from_millis(600),
            sweep: Duration::from_secs(10),
        }
    }

    fn view(heard: Instant, leads: &[(GroupId, u64)]) -> PeerView {
        PeerView {
            heard,
            incarnation: 1,
            leads: leads.iter().copied().collect(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// One node's decisions about group 5 (voters 1, 2, 3; term 3), with jitter 0.
    struct Node {
        me: NodeId,
        g: GroupView,
        order: Vec<NodeId>,
        memo: Memo,
        revived: BTreeSet<NodeId>,
    }

    impl Node {
        fn new(me: NodeId, leader: Option<NodeId>, order: &[NodeId], t0: Instant) -> Node {
            Node {
                me,
                g: GroupView {
                    group: 5,
                    leading: leader == Some(me),
                    candidate: false,
                    leader,
                    term: 3,
                    voters: vec![1, 2, 3],
                    members: vec![1, 2, 3],
                },
                order: order.to_vec(),
                memo: Memo::new(t0),
                revived: BTreeSet::new(),
            }
        }

        fn at(&mut self, views: &BTreeMap<NodeId, PeerView>, now: Instant) -> Action {
            let (g, order, revived) = (&self.g, &self.order, &self.revived);
            decide(
                self.me,
                g,
                order,
                views,
                revived,
                &mut self.memo,
                now,
                &timing(),
                0.0,
            )
        }
    }

    #[test]
    fn a_follower_of_a_live_claiming_leader_never_stands() {
        let t0 = Instant::now();
        let mut n1 = Node::new(1, Some(2), &[1, 2, 3], t0);
        for step in 0..50 {
            let now = t0 + ms(200) * step;
            let views = BTreeMap::from([(2, view(now, &[(5, 3)])), (3, view(now, &[]))]);
            assert_eq!(n1.at(&views, now), Action::Nothing, "step {step}");
        }
    }

    #[test]
    fn a_dead_leader_is_replaced_by_the_first_live_voter_then_the_next() {
        // Goal: after the leader's node falls silent, the best-ranked live voter stands as soon
        // as the leader counts as dead; the next one a beat later, and not before.
        let t0 = Instant::now();
        let order = [2, 1, 3]; // 2 is the dead leader; 1 ranks before 3
        let views = |now: Instant| {
            BTreeMap::from([
                (2, view(t0, &[(5, 3)])),
                (3, view(now, &[])),
                (1, view(now, &[])),
            ])
        };
        let mut n1 = Node::new(1, Some(2), &order, t0);
        let mut n3 = Node::new(3, Some(2), &order, t0);
        let at = |n: &mut Node, after: u64| n.at(&views(t0 + ms(after)), t0 + ms(after));
        assert_eq!(at(&mut n1, 500), Action::Nothing);
        assert_eq!(at(&mut n3, 500), Action::Nothing);
        assert_eq!(at(&mut n1, 600), Action::Stand);
        assert_eq!(at(&mut n3, 600), Action::Nothing);
        assert_eq!(at(&mut n3, 800), Action::Stand);
        // Node 1 stands again no sooner than a beat (times 1 + jitter) later.
        assert_eq!(at(&mut n1, 700), Action::Nothing);
        assert_eq!(at(&mut n1, 800), Action::Stand);
    }

    #[test]
    fn a_live_leader_that_stopped_claiming_the_group_is_replaced_after_a_while() {
        let t0 = Instant::now();
        let mut n1 = Node::new(1, Some(2), &[1, 2, 3], t0);
        let quiet = |now: Instant| BTreeMap::from([(2, view(now, &[])), (3, view(now, &[]))]);
        for step in 0..3 {
            let now = t0 + ms(200) * step;
            assert_eq!(n1.at(&quiet(now), now), Action::Nothing);
        }
        assert_eq!(n1.at(&quiet(t0 + ms(600)), t0 + ms(600)), Action::Stand);
    }

    #[test]
    fn a_restarted_node_follows_a_live_claimant_instead_of_standing() {
        // After a restart raft knows no leader; a live voter's beat claiming the group at our
        // term names it, so the node waits for its heartbeat instead of disrupting it.
        let t0 = Instant::now();
        let mut n1 = Node::new(1, None, &[1, 2, 3], t0);
        let claimed = BTreeMap::from([(3, view(t0, &[(5, 3)]))]);
        assert_eq!(n1.at(&claimed, t0), Action::Nothing);
        // With nobody claiming it, the best-ranked node stands at once.
        let unclaimed = BTreeMap::from([(3, view(t0, &[])), (2, view(t0, &[]))]);
        assert_eq!(n1.at(&unclaimed, t0), Action::Stand);
    }

    #[test]
    fn learners_never_stand() {
        let t0 = Instant::now();
        let mut n1 = Node::new(1, None, &[2, 3], t0);
        n1.g.voters = vec![2, 3];
        assert_eq!(n1.at(&BTreeMap::new(), t0 + ms(5000)), Action::Nothing);
    }

    #[test]
    fn a_leader_heartbeats_only_for_a_reason() {
        // Goal: a leader with nothing new sends no heartbeat until its sweep; a revived follower
        // or a higher-term claimant triggers one at once.
        let t0 = Instant::now();
        let mut n1 = Node::new(1, Some(1), &[1, 2, 3], t0);
        let quiet = BTreeMap::from([(2, view(t0, &[])), (3, view(t0, &[]))]);
        assert_eq!(n1.at(&quiet, t0), Action::Nothing);
        assert_eq!(n1.at(&quiet, t0 + ms(100)), Action::Nothing);
        n1.revived = BTreeSet::from([3]);
        assert_eq!(n1.at(&quiet, t0 + ms(200)), Action::Heartbeat);
        n1.revived.clear();
        let rival = BTreeMap::from([(2, view(t0 + ms(400), &[(5, 4)]))]);
        assert_eq!(n1.at(&rival, t0 + ms(400)), Action::Heartbeat);
        assert_eq!(n1.at(&quiet, t0 + ms(600)), Action::Nothing);
        assert_eq!(
            n1.at(&quiet, t0 + ms(400) + timing().sweep),
            Action::Heartbeat
        );
    }

    #[test]
    fn a_peer_heard_again_after_silence_or_a_restart_is_revived_once() {
        let l = Liveness::new();
        let t0 = Instant::now();
        let beat = |inc| Beat {
            incarnation: inc,
            leads: vec![],
        };
        let dead_after = ms(600);
        l.heard(2, beat(7), t0, dead_after);
        assert_eq!(l.take().1, BTreeSet::from([2]));
        l.heard(2, beat(7), t0 + ms(200), dead_after);
        assert!(l.take().1.is_empty());
        l.heard(2, beat(8), t0 + ms(400), dead_after);
        assert_eq!(l.take().1, BTreeSet::from([2]));
        l.heard(2, beat(8), t0 + ms(1500), dead_after);
        assert_eq!(l.take().1, BTreeSet::from([2]));
    }

    #[test]
    fn one_node_of_each_pair_calls_and_the_other_only_when_its_beats_stop() {
        // Goal: exactly one of every pair sends beats, each node calls about half its peers,
        // and the answering side takes over as soon as the caller's beats stop arriving.
        for a in 1..=9u64 {
            for b in (a + 1)..=9 {
                assert_ne!(initiates(a, b), initiates(b, a), "pair {a},{b}");
            }
            let calls = (1..=9).filter(|b| *b != a && initiates(a, *b)).count();
            assert!(
                (3..=5).contains(&calls),
                "node {a} calls {calls} of 8 peers"
            );
        }
        let (caller, answerer) = if initiates(1, 2) { (1, 2) } else { (2, 1) };
        let l = Liveness::new();
        let t0 = Instant::now();
        let beat = Beat::default();
        let b = ms(200);
        assert!(l.should_call(caller, answerer, t0, b));
        assert!(l.should_call(answerer, caller, t0, b), "never asked yet");
        l.asked(caller, beat, t0, ms(600));
        assert!(!l.should_call(answerer, caller, t0 + ms(200), b));
        assert!(!l.should_call(answerer, caller, t0 + ms(299), b));
        assert!(l.should_call(answerer, caller, t0 + ms(300), b));
    }
}
