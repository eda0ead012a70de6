//! Property tests: random operation sequences against a reference model of the accounting.
//!
//! After every step the kernel's counters must equal the model's, a fresh admission must never
//! leave `spent + reserved > budget`, and `audit` (chain, replay, sums) must be clean.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use aex_core::{AdmitRequest, AgentSpec, Error, ExecutionState, KernelOptions, ManualClock, TeamSpec, Usage, money};
use common::*;
use proptest::prelude::*;

const TTL: i64 = 10_000;
const AGENTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// With `edge = Some(d)`, the budget is first set to exactly what is committed, reserved and
    /// about to be estimated, plus `d` (-1, 0 or 1): admission on its boundary.
    Admit { agent: usize, id: Option<u8>, big: bool, input: i64, max_out: Option<i64>, edge: Option<i64> },
    Dispatch { exec: usize },
    Commit { exec: usize, input: i64, output: i64 },
    Release { exec: usize },
    Fail { exec: usize },
    SetBudget { agent: usize, budget: i64 },
    AddBudget { agent: usize, delta: i64 },
    Disable { agent: usize, disabled: bool },
    SetTeamBudget { budget: i64 },
    Advance { ms: i64 },
    Reconcile,
}

fn op() -> impl Strategy<Value = Op> {
    let agent = 0..AGENTS;
    prop_oneof![
        6 => (agent.clone(), proptest::option::of(0u8..6), any::<bool>(), 0i64..3_000, proptest::option::of(1i64..6_000), proptest::option::weighted(0.3, -1i64..=1))
            .prop_map(|(agent, id, big, input, max_out, edge)| Op::Admit { agent, id, big, input, max_out, edge }),
        2 => (0usize..64).prop_map(|exec| Op::Dispatch { exec }),
        4 => (0usize..64, 0i64..4_000, 0i64..8_000).prop_map(|(exec, input, output)| Op::Commit { exec, input, output }),
        1 => (0usize..64).prop_map(|exec| Op::Release { exec }),
        1 => (0usize..64).prop_map(|exec| Op::Fail { exec }),
        1 => (agent.clone(), 0i64..200_000).prop_map(|(agent, budget)| Op::SetBudget { agent, budget }),
        1 => (agent.clone(), -100_000i64..100_000).prop_map(|(agent, delta)| Op::AddBudget { agent, delta }),
        1 => (agent, any::<bool>()).prop_map(|(agent, disabled)| Op::Disable { agent, disabled }),
        1 => (0i64..100_000).prop_map(|budget| Op::SetTeamBudget { budget }),
        2 => (0i64..7_000).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Reconcile),
    ]
}

#[derive(Debug, Default)]
struct MAgent {
    budget: i64,
    spent: i64,
    reserved: i64,
    disabled: bool,
}

#[derive(Debug)]
struct MExec {
    agent: usize,
    request: AdmitRequest,
    prices: aex_core::Prices,
    reserved: i64,
    state: ExecutionState,
    expires_at: i64,
    usage: Option<Usage>,
    expired: bool,
}

/// Agents 0 and 1 draw from the team "org" too; agent 2 does not.
const TEAM_MEMBERS: usize = 2;

struct Model {
    agents: Vec<MAgent>,
    team: MAgent,
    execs: HashMap<String, MExec>,
    order: Vec<String>,
    now: i64,
}

impl Model {
    fn expire(&mut self, id: &str) {
        let e = self.execs.get_mut(id).unwrap();
        if !e.state.is_open() || e.expires_at > self.now {
            return;
        }
        let dispatched = e.state == ExecutionState::Dispatched;
        let charged = if dispatched { e.reserved } else { 0 };
        e.state = if dispatched { ExecutionState::Committed } else { ExecutionState::Released };
        e.expired = true;
        let (agent, reserved) = (e.agent, e.reserved);
        self.post(agent, reserved, charged);
    }

    /// Takes a reservation off the agent (and its team) and charges `charged`.
    fn post(&mut self, agent: usize, reserved: i64, charged: i64) {
        let a = &mut self.agents[agent];
        a.reserved -= reserved;
        a.spent += charged;
        if agent < TEAM_MEMBERS {
            self.team.reserved -= reserved;
            self.team.spent += charged;
        }
    }

    fn expire_agent(&mut self, agent: Option<usize>) {
        let ids: Vec<String> = self.order.clone();
        for id in ids {
            if agent.is_none_or(|a| self.execs[&id].agent == a) {
                self.expire(&id);
            }
        }
    }
}

fn name(i: usize) -> String {
    format!("agent-{i}")
}

fn run(ops: Vec<Op>, budgets: [i64; AGENTS], team_budget: i64) {
    let clock = ManualClock::new(T0);
    let options = KernelOptions { reservation_ttl_ms: TTL, config: config(), clock: Arc::new(clock.clone()), ..Default::default() };
    let k = common::store_kernel(options);
    let cfg = config();
    let mut tokens = Vec::new();
    let mut m = Model {
        agents: Vec::new(),
        team: MAgent { budget: team_budget, ..Default::default() },
        execs: HashMap::new(),
        order: Vec::new(),
        now: T0,
    };
    k.create_team(&TeamSpec::new("org", team_budget)).unwrap();
    for (i, b) in budgets.iter().enumerate() {
        let team = (i < TEAM_MEMBERS).then(|| "org".to_string());
        tokens.push(k.create_agent(&AgentSpec { team, ..AgentSpec::new(name(i), *b) }).unwrap().token.expose().to_string());
        m.agents.push(MAgent { budget: *b, ..Default::default() });
    }

    for op in ops {
        match op {
            Op::Admit { agent, id, big, input, max_out, edge } => {
                let model = if big { BIG_MODEL } else { MODEL };
                let spec = cfg.model(model).unwrap();
                let out = max_out.map_or(spec.max_output_tokens, |n| n.min(spec.max_output_tokens));
                let estimate = money::cost(input, spec.prices.unwrap().input) + money::cost(out, spec.prices.unwrap().output);
                if let Some(d) = edge {
                    k.reconcile().unwrap();
                    m.expire_agent(None);
                    // For team members with an odd input, the team is put on the boundary instead.
                    let team_edge = agent < TEAM_MEMBERS && (input % 2 == 1);
                    let a = &mut m.agents[agent];
                    a.budget = (a.spent + a.reserved + estimate + if team_edge { 100_000 } else { d }).max(0);
                    k.set_budget(&name(agent), a.budget).unwrap();
                    if team_edge {
                        m.team.budget = (m.team.spent + m.team.reserved + estimate + d).max(0);
                        k.set_team_budget("org", m.team.budget).unwrap();
                    }
                }
                let mut r = AdmitRequest::new(model).input_tokens(input);
                r.max_output_tokens = max_out;
                r.execution_id = id.map(|i| format!("x{i}"));
                let got = k.admit(&tokens[agent], &r);
                if m.agents[agent].disabled {
                    assert_eq!(got.unwrap_err().reason(), "agent_disabled");
                    continue;
                }
                m.expire_agent(Some(agent));
                if let Some(id) = &r.execution_id
                    && let Some(e) = m.execs.get(id)
                {
                    if e.agent == agent && e.request == r {
                        let a = got.unwrap();
                        assert!(a.replayed && a.reserved_micro == e.reserved && a.state == e.state);
                    } else {
                        assert_eq!(got.unwrap_err().reason(), "idempotency_conflict");
                    }
                    continue;
                }
                let a = &mut m.agents[agent];
                let remaining = a.budget - a.spent - a.reserved;
                if remaining < estimate {
                    let want = Error::InsufficientBudget { agent: name(agent), team: None, needed_micro: estimate, remaining_micro: remaining };
                    assert_eq!(got.unwrap_err(), want);
                    continue;
                }
                let team_remaining = m.team.budget - m.team.spent - m.team.reserved;
                if agent < TEAM_MEMBERS && team_remaining < estimate {
                    let want = Error::InsufficientBudget {
                        agent: name(agent),
                        team: Some("org".into()),
                        needed_micro: estimate,
                        remaining_micro: team_remaining,
                    };
                    assert_eq!(got.unwrap_err(), want);
                    continue;
                }
                let adm = got.unwrap();
                assert_eq!((adm.reserved_micro, adm.replayed), (estimate, false));
                m.agents[agent].reserved += estimate;
                let live = k.agent(&name(agent)).unwrap();
                assert!(live.spent_micro + live.reserved_micro <= live.budget_micro, "admission overshot: {live:?}");
                if agent < TEAM_MEMBERS {
                    m.team.reserved += estimate;
                    let team = k.team("org").unwrap();
                    assert!(team.spent_micro + team.reserved_micro <= team.budget_micro, "admission overshot the team: {team:?}");
                }
                m.order.push(adm.execution_id.clone());
                let e = MExec {
                    agent,
                    request: r,
                    prices: spec.prices.unwrap(),
                    reserved: estimate,
                    state: ExecutionState::Reserved,
                    expires_at: m.now + TTL,
                    usage: None,
                    expired: false,
                };
                m.execs.insert(adm.execution_id, e);
            }
            Op::Dispatch { exec } => {
                let Some(id) = m.order.get(exec).cloned() else { continue };
                m.expire(&id);
                let got = k.mark_dispatched(&id);
                let e = m.execs.get_mut(&id).unwrap();
                match e.state {
                    ExecutionState::Reserved | ExecutionState::Dispatched => {
                        got.unwrap();
                        e.state = ExecutionState::Dispatched;
                    }
                    _ => assert_eq!(got.unwrap_err().status(), 409),
                }
            }
            Op::Commit { exec, .. } | Op::Fail { exec } | Op::Release { exec } if exec >= m.order.len() => {}
            Op::Commit { exec, input, output } => {
                let id = m.order[exec].clone();
                m.expire(&id);
                let usage = Usage::new(input, output);
                let got = k.commit(&id, usage);
                let e = m.execs.get_mut(&id).unwrap();
                if e.state.is_open() {
                    let cost = usage.cost(&e.prices);
                    let s = got.unwrap();
                    assert_eq!((s.cost_micro, s.overrun_micro, s.replayed), (cost, (cost - e.reserved).max(0), false));
                    e.state = ExecutionState::Committed;
                    e.usage = Some(usage);
                    let (agent, reserved) = (e.agent, e.reserved);
                    m.post(agent, reserved, cost);
                } else if e.state == ExecutionState::Committed && e.usage == Some(usage) {
                    assert!(got.unwrap().replayed);
                } else {
                    let want = if e.expired { "execution_expired" } else { "invalid_transition" };
                    assert_eq!(got.unwrap_err().reason(), want);
                }
            }
            Op::Release { exec } | Op::Fail { exec } => {
                let id = m.order[exec].clone();
                m.expire(&id);
                let (got, target) = if matches!(op, Op::Release { .. }) {
                    (k.release(&id, "model"), ExecutionState::Released)
                } else {
                    (k.fail(&id, "model"), ExecutionState::Failed)
                };
                let e = m.execs.get_mut(&id).unwrap();
                if e.state.is_open() {
                    let s = got.unwrap();
                    assert_eq!((s.released_micro, s.replayed), (e.reserved, false));
                    e.state = target;
                    let (agent, reserved) = (e.agent, e.reserved);
                    m.post(agent, reserved, 0);
                } else if e.state == target {
                    assert!(got.unwrap().replayed);
                } else {
                    assert_eq!(got.unwrap_err().status(), 409);
                }
            }
            Op::SetBudget { agent, budget } => {
                k.set_budget(&name(agent), budget).unwrap();
                m.agents[agent].budget = budget;
            }
            Op::AddBudget { agent, delta } => {
                let got = k.add_budget(&name(agent), delta);
                let new = m.agents[agent].budget + delta;
                if new < 0 {
                    assert_eq!(got.unwrap_err().status(), 400);
                } else {
                    assert_eq!(got.unwrap().budget_micro, new);
                    m.agents[agent].budget = new;
                }
            }
            Op::SetTeamBudget { budget } => {
                k.set_team_budget("org", budget).unwrap();
                m.team.budget = budget;
            }
            Op::Disable { agent, disabled } => {
                k.set_disabled(&name(agent), disabled).unwrap();
                m.agents[agent].disabled = disabled;
            }
            Op::Advance { ms } => {
                clock.advance(ms);
                m.now += ms;
            }
            Op::Reconcile => {
                k.reconcile().unwrap();
                m.expire_agent(None);
            }
        }

        for (i, ma) in m.agents.iter().enumerate() {
            let a = k.agent(&name(i)).unwrap();
            assert_eq!(
                (a.budget_micro, a.spent_micro, a.reserved_micro, a.disabled),
                (ma.budget, ma.spent, ma.reserved, ma.disabled),
                "agent {i} after {op:?}"
            );
        }
        let team = k.team("org").unwrap();
        assert_eq!((team.budget_micro, team.spent_micro, team.reserved_micro), (m.team.budget, m.team.spent, m.team.reserved), "team after {op:?}");
        let report = k.audit(None).unwrap();
        assert!(report.is_clean(), "audit after {op:?}: {:?}", report.failure);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn accounting_matches_the_model(
        ops in proptest::collection::vec(op(), 1..60),
        budgets in [0i64..20_000, 0i64..200_000, 0i64..2_000_000],
        team_budget in 0i64..60_000,
    ) {
        run(ops, budgets, team_budget);
    }
}
