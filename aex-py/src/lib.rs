//! The native module `aex._aex`: converts Python values to `aex_core` types and errors to the
//! exceptions of `aex.errors`, and holds no rules. The pure-Python package in `python/aex`
//! builds the friendly surface (the guard, usage objects, the CLI) on top.
//!
//! Every call that touches the store releases the GIL (`py.detach`) after its arguments are
//! converted, so threads sharing one kernel run their store work in parallel with Python code.

#![allow(clippy::too_many_arguments)]

mod convert;

use std::sync::Arc;

use aex_core::{AdmitRequest, AgentSpec, BudgetPeriod, Capabilities, Config, Durability, Head, Kernel, KernelOptions, ManualClock, Message, Scope, StoreOptions, TeamSpec, Usage, wire};
use pyo3::prelude::*;
use pyo3::types::PyAny;

use convert::{ToPy, amount_micro, err, invalid};

/// A governance kernel over one SQLite database. Thread-safe; share one between threads.
/// After `os.fork()`, open a new kernel in the child: a SQLite connection must not cross a fork.
#[pyclass(frozen, subclass, name = "Kernel", module = "aex._aex")]
struct Kernel_ {
    kernel: Kernel,
    clock: Option<ManualClock>,
}

fn detach<T: Send>(py: Python<'_>, f: impl FnOnce() -> aex_core::Result<T> + Send) -> PyResult<T> {
    py.detach(f).map_err(|e| err(py, &e))
}

/// An admitted execution. Read its fields as attributes (`a.execution_id`) or like a dict
/// (`a["execution_id"]`, `a.to_dict()`).
#[pyclass(frozen, get_all, name = "Admission", module = "aex._aex")]
struct PyAdmission {
    execution_id: String,
    agent: String,
    model: String,
    input_tokens: i64,
    max_output_tokens: i64,
    reserved_micro: i64,
    expires_at_ms: i64,
    state: &'static str,
    replayed: bool,
}

/// The outcome of commit, release or fail; attributes or dict access, like `Admission`.
#[pyclass(frozen, get_all, name = "Settlement", module = "aex._aex")]
struct PySettlement {
    execution_id: String,
    agent: String,
    state: &'static str,
    reserved_micro: i64,
    cost_micro: i64,
    released_micro: i64,
    overrun_micro: i64,
    expired: bool,
    replayed: bool,
}

/// One provider call in flight (`aex_core::call::Call`): the guard and the integrations feed it
/// (sent, output, usage) and end it; it alone decides whether the call is charged or released,
/// by the money rules. Ended exactly once; one that is garbage-collected unended settles as
/// interrupted. Thread-safe (one lock).
#[pyclass(frozen, name = "Call", module = "aex._aex")]
struct PyCall {
    call: std::sync::Mutex<Option<aex_core::call::Call>>,
}

impl PyCall {
    fn with<T>(&self, py: Python<'_>, f: impl FnOnce(&mut aex_core::call::Call) -> T) -> PyResult<T> {
        let mut guard = self.call.lock().map_err(|_| pyo3::exceptions::PyRuntimeError::new_err("the call's lock is poisoned"))?;
        match guard.as_mut() {
            Some(call) => Ok(f(call)),
            None => Err(err(py, &aex_core::Error::Conflict { reason: aex_core::ConflictReason::InvalidTransition, message: "this call has already ended".into() })),
        }
    }
}

#[pymethods]
impl PyCall {
    #[getter]
    fn execution_id(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |c| c.execution_id().to_string())
    }

    /// The request may have reached the provider.
    fn sent(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, aex_core::call::Call::sent)
    }

    /// Output the provider produced (text, tool-call arguments), for counting.
    fn output(&self, py: Python<'_>, text: &str) -> PyResult<()> {
        self.with(py, |c| c.output(text))
    }

    /// One answer body or stream event (its JSON text) as the provider sent it: its output and
    /// usage are read by the kernel's rules (`aex_core::call::Call::observe`). Returns whether it
    /// says the answer is whole. Text that is not a JSON object is ignored (False).
    #[pyo3(signature = (data, embeddings=false))]
    fn observe(&self, py: Python<'_>, data: &str, embeddings: bool) -> PyResult<bool> {
        match serde_json::from_str::<serde_json::Value>(data) {
            Ok(v) if v.is_object() => self.with(py, |c| c.observe(&v, embeddings)),
            _ => Ok(false),
        }
    }

    /// The provider's reported token counts.
    #[pyo3(signature = (input_tokens, output_tokens, cached_input_tokens=None))]
    fn reported(&self, py: Python<'_>, input_tokens: &Bound<'_, PyAny>, output_tokens: &Bound<'_, PyAny>, cached_input_tokens: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let usage = Usage {
            input_tokens: convert::int(py, "input_tokens", input_tokens)?,
            output_tokens: convert::int(py, "output_tokens", output_tokens)?,
            cached_input_tokens: convert::opt_int(py, "cached_input_tokens", cached_input_tokens)?.unwrap_or(0),
        };
        self.with(py, |c| c.reported(usage))
    }

    /// Ends the call: `how` is `completed`, `interrupted` (`detail` says why), `failed` (the
    /// provider failed; `detail` says how: released if no output was seen, else charged for it),
    /// `refused` (`status`), or `not_sent` (aex knows nothing reached the provider). Returns the
    /// settlement and whether aex estimated it.
    #[pyo3(signature = (how, detail="", status=0))]
    fn end(&self, py: Python<'_>, how: &str, detail: &str, status: u16) -> PyResult<(PySettlement, bool)> {
        use aex_core::call::Ending;
        let ending = match how {
            "completed" => Ending::Completed,
            "interrupted" => Ending::Interrupted(detail.to_string()),
            "failed" => Ending::Failed(detail.to_string()),
            "refused" => Ending::Refused { status },
            "not_sent" => Ending::NotSent(detail.to_string()),
            _ => return Err(invalid(py, "how", format!("must be completed, interrupted, failed, refused or not_sent, got '{how}'"))),
        };
        let call = self
            .call
            .lock()
            .map_err(|_| pyo3::exceptions::PyRuntimeError::new_err("the call's lock is poisoned"))?
            .take()
            .ok_or_else(|| err(py, &aex_core::Error::Conflict { reason: aex_core::ConflictReason::InvalidTransition, message: "this call has already ended".into() }))?;
        let settled = detach(py, move || call.end(ending))?;
        Ok((PySettlement::from(settled.settlement), settled.estimated))
    }

    /// Whether the call has ended.
    #[getter]
    fn ended(&self) -> bool {
        self.call.lock().map_or(true, |c| c.is_none())
    }
}

impl From<aex_core::Admission> for PyAdmission {
    fn from(a: aex_core::Admission) -> Self {
        PyAdmission {
            execution_id: a.execution_id,
            agent: a.agent,
            model: a.model,
            input_tokens: a.input_tokens,
            max_output_tokens: a.max_output_tokens,
            reserved_micro: a.reserved_micro,
            expires_at_ms: a.expires_at_ms,
            state: a.state.as_str(),
            replayed: a.replayed,
        }
    }
}

impl From<aex_core::Settlement> for PySettlement {
    fn from(s: aex_core::Settlement) -> Self {
        PySettlement {
            execution_id: s.execution_id,
            agent: s.agent,
            state: s.state.as_str(),
            reserved_micro: s.reserved_micro,
            cost_micro: s.cost_micro,
            released_micro: s.released_micro,
            overrun_micro: s.overrun_micro,
            expired: s.expired,
            replayed: s.replayed,
        }
    }
}

/// `obj[key]` and `to_dict()` over a frozen result's attributes.
macro_rules! dict_like {
    ($t:ty, [$($field:ident),+]) => {
        #[pymethods]
        impl $t {
            fn __getitem__(slf: &Bound<'_, Self>, key: &str) -> PyResult<Py<PyAny>> {
                match key {
                    $(stringify!($field) => Ok(slf.getattr(stringify!($field))?.unbind()),)+
                    _ => Err(pyo3::exceptions::PyKeyError::new_err(key.to_string())),
                }
            }

            #[pyo3(signature = (key, default=None))]
            fn get(slf: &Bound<'_, Self>, key: &str, default: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
                match key {
                    $(stringify!($field) => Ok(slf.getattr(stringify!($field))?.unbind()),)+
                    _ => Ok(default.unwrap_or_else(|| slf.py().None())),
                }
            }

            fn to_dict<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
                let d = pyo3::types::PyDict::new(slf.py());
                $(d.set_item(stringify!($field), slf.getattr(stringify!($field))?)?;)+
                Ok(d)
            }

            fn __repr__(&self) -> String {
                let mut parts = Vec::new();
                $(parts.push(format!("{}={:?}", stringify!($field), self.$field));)+
                format!("{}({})", stringify!($t).trim_start_matches("Py"), parts.join(", "))
            }
        }
    };
}

dict_like!(PyAdmission, [execution_id, agent, model, input_tokens, max_output_tokens, reserved_micro, expires_at_ms, state, replayed]);
dict_like!(PySettlement, [execution_id, agent, state, reserved_micro, cost_micro, released_micro, overrun_micro, expired, replayed]);

#[pymethods]
impl Kernel_ {
    #[new]
    #[pyo3(signature = (path, *, config=None, config_yaml=None, durability="full", ledger_key=None, reservation_ttl_ms=None, manual_clock_ms=None, connect_timeout_ms=10_000, request_timeout_ms=600_000, max_retries=2))]
    fn new(
        py: Python<'_>,
        path: &str,
        config: Option<&str>,
        config_yaml: Option<&str>,
        durability: &str,
        ledger_key: Option<&Bound<'_, PyAny>>,
        reservation_ttl_ms: Option<i64>,
        manual_clock_ms: Option<i64>,
        connect_timeout_ms: i64,
        request_timeout_ms: i64,
        max_retries: i64,
    ) -> PyResult<Self> {
        let store = StoreOptions { durability: Durability::parse(durability).map_err(|e| err(py, &e))?, ..StoreOptions::default() };
        let mut options = KernelOptions { store, ..KernelOptions::default() };
        options.config = match (config, config_yaml) {
            (Some(_), Some(_)) => return Err(invalid(py, "config", "give config or config_yaml, not both")),
            (Some(p), None) => Config::load(p).map_err(|e| err(py, &e))?,
            (None, Some(text)) => Config::from_yaml(text).map_err(|e| err(py, &e))?,
            (None, None) => Config::default(),
        };
        options.ledger_key = match ledger_key {
            None => None,
            // A text key is used as its UTF-8 bytes.
            Some(k) if k.is_instance_of::<pyo3::types::PyString>() => Some(k.extract::<String>()?.into_bytes()),
            Some(k) if k.is_instance_of::<pyo3::types::PyBytes>() || k.is_instance_of::<pyo3::types::PyByteArray>() => Some(k.extract::<Vec<u8>>()?),
            Some(_) => return Err(invalid(py, "ledger_key", "must be bytes or str")),
        };
        for (field, ms) in [("connect_timeout_ms", connect_timeout_ms), ("request_timeout_ms", request_timeout_ms)] {
            if ms <= 0 {
                return Err(invalid(py, field, format!("must be a positive number of milliseconds, got {ms}")));
            }
        }
        if !(0..=10).contains(&max_retries) {
            return Err(invalid(py, "max_retries", format!("must be between 0 and 10, got {max_retries}")));
        }
        let (connect_timeout_ms, request_timeout_ms, max_retries) = (connect_timeout_ms as u64, request_timeout_ms as u64, max_retries as u32);
        options.dispatch = aex_core::dispatch::DispatchOptions {
            connect_timeout: std::time::Duration::from_millis(connect_timeout_ms),
            request_timeout: std::time::Duration::from_millis(request_timeout_ms),
            max_retries,
            ..Default::default()
        };
        if let Some(ttl) = reservation_ttl_ms {
            options.reservation_ttl_ms = ttl;
        }
        let clock = manual_clock_ms.map(ManualClock::new);
        if let Some(c) = &clock {
            options.clock = Arc::new(c.clone());
        }
        let path = path.to_string();
        let kernel = detach(py, move || if path == ":memory:" { Kernel::open_in_memory(options) } else { Kernel::open(&path, options) })?;
        Ok(Kernel_ { kernel, clock })
    }

    /// For tests: moves a manual clock (opened with `manual_clock_ms`).
    fn advance_clock(&self, py: Python<'_>, ms: i64) -> PyResult<()> {
        let clock = self.clock.as_ref().ok_or_else(|| invalid(py, "manual_clock_ms", "this kernel was not opened with a manual clock"))?;
        clock.advance(ms);
        Ok(())
    }

    #[pyo3(signature = (name, budget_usd, *, rpm=None, tpm=None, allowed_models=None, tools=true, streaming=true, vision=true, strict=false, ttl_ms=None, scope="execution", allow_passthrough=false, max_concurrent=None, budget_period="never", team=None))]
    fn create_agent(
        &self,
        py: Python<'_>,
        name: &str,
        budget_usd: &Bound<'_, PyAny>,
        rpm: Option<&Bound<'_, PyAny>>,
        tpm: Option<&Bound<'_, PyAny>>,
        allowed_models: Option<Vec<String>>,
        tools: bool,
        streaming: bool,
        vision: bool,
        strict: bool,
        ttl_ms: Option<&Bound<'_, PyAny>>,
        scope: &str,
        allow_passthrough: bool,
        max_concurrent: Option<&Bound<'_, PyAny>>,
        budget_period: &str,
        team: Option<String>,
    ) -> PyResult<String> {
        let spec = AgentSpec {
            name: name.to_string(),
            budget_micro: amount_micro(py, "budget_usd", budget_usd)?,
            rpm: convert::opt_int(py, "rpm", rpm)?,
            tpm: convert::opt_int(py, "tpm", tpm)?,
            allowed_models: allowed_models.unwrap_or_default(),
            capabilities: Capabilities { tools, streaming, vision },
            strict,
            ttl_ms: convert::opt_int(py, "ttl_ms", ttl_ms)?,
            scope: Scope::parse(scope).map_err(|e| err(py, &e))?,
            allow_passthrough,
            max_concurrent: convert::opt_int(py, "max_concurrent", max_concurrent)?,
            budget_period: BudgetPeriod::parse(budget_period).map_err(|e| err(py, &e))?,
            team,
        };
        let created = detach(py, || self.kernel.create_agent(&spec))?;
        Ok(created.token.expose().to_string())
    }

    fn list_agents(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let agents = detach(py, || self.kernel.list_agents())?;
        serde_json::Value::from(agents.iter().map(wire::agent_json).collect::<Vec<_>>()).to_py(py)
    }

    fn agent(&self, py: Python<'_>, name: &str) -> PyResult<Py<PyAny>> {
        let a = detach(py, || self.kernel.agent(name))?;
        wire::agent_json(&a).to_py(py)
    }

    fn set_budget(&self, py: Python<'_>, name: &str, budget_usd: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let micro = amount_micro(py, "budget_usd", budget_usd)?;
        let a = detach(py, || self.kernel.set_budget(name, micro))?;
        wire::agent_json(&a).to_py(py)
    }

    fn add_budget(&self, py: Python<'_>, name: &str, delta_usd: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let micro = convert::signed_amount_micro(py, "delta_usd", delta_usd)?;
        // The core names its argument `delta_micro`; here it is `delta_usd`.
        let a = py.detach(|| self.kernel.add_budget(name, micro)).map_err(|e| match e {
            aex_core::Error::InvalidRequest { field, rule } if field == "delta_micro" => {
                invalid(py, "delta_usd", rule.replace("micro-USD", "micro-USD (USD x 1e6)"))
            }
            other => err(py, &other),
        })?;
        wire::agent_json(&a).to_py(py)
    }

    fn set_budget_period(&self, py: Python<'_>, name: &str, period: &str) -> PyResult<Py<PyAny>> {
        let period = BudgetPeriod::parse(period).map_err(|e| err(py, &e))?;
        let a = detach(py, || self.kernel.set_budget_period(name, period))?;
        wire::agent_json(&a).to_py(py)
    }

    fn disable(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        detach(py, || self.kernel.set_disabled(name, true)).map(drop)
    }

    fn enable(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        detach(py, || self.kernel.set_disabled(name, false)).map(drop)
    }

    fn delete_agent(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        detach(py, || self.kernel.delete_agent(name))
    }

    #[pyo3(signature = (name, *, ttl_ms=None))]
    fn rotate_token(&self, py: Python<'_>, name: &str, ttl_ms: Option<&Bound<'_, PyAny>>) -> PyResult<String> {
        let ttl = convert::opt_int(py, "ttl_ms", ttl_ms)?;
        detach(py, || self.kernel.rotate_token(name, ttl)).map(|t| t.expose().to_string())
    }

    #[pyo3(signature = (name, budget_usd, *, parent=None))]
    fn create_team(&self, py: Python<'_>, name: &str, budget_usd: &Bound<'_, PyAny>, parent: Option<String>) -> PyResult<Py<PyAny>> {
        let spec = TeamSpec { name: name.to_string(), budget_micro: amount_micro(py, "budget_usd", budget_usd)?, parent };
        let t = detach(py, || self.kernel.create_team(&spec))?;
        wire::team_json(&t).to_py(py)
    }

    fn team(&self, py: Python<'_>, name: &str) -> PyResult<Py<PyAny>> {
        let t = detach(py, || self.kernel.team(name))?;
        wire::team_json(&t).to_py(py)
    }

    fn list_teams(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let teams = detach(py, || self.kernel.list_teams())?;
        serde_json::Value::from(teams.iter().map(wire::team_json).collect::<Vec<_>>()).to_py(py)
    }

    fn set_team_budget(&self, py: Python<'_>, name: &str, budget_usd: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let micro = amount_micro(py, "budget_usd", budget_usd)?;
        let t = detach(py, || self.kernel.set_team_budget(name, micro))?;
        wire::team_json(&t).to_py(py)
    }

    fn delete_team(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        detach(py, || self.kernel.delete_team(name))
    }

    /// Admits the request an OpenAI-style body describes (`endpoint`: "chat", "responses" or
    /// "embeddings"), counting everything the provider bills as input — tool definitions,
    /// schemas, tool calls, input items, token arrays — as the dispatcher does
    /// (`aex_core::dispatch::request_of`). `passthrough`: the request carries the agent's key.
    /// `input_tokens` (counted by the caller) and `vision` override what the body implies.
    #[pyo3(signature = (token, endpoint, body, *, execution_id=None, passthrough=false, input_tokens=None, vision=None))]
    fn admit_body(
        &self,
        py: Python<'_>,
        token: &str,
        endpoint: &str,
        body: &str,
        execution_id: Option<String>,
        passthrough: bool,
        input_tokens: Option<&Bound<'_, PyAny>>,
        vision: Option<bool>,
    ) -> PyResult<PyAdmission> {
        let endpoint = aex_core::dispatch::Endpoint::parse(endpoint).map_err(|e| err(py, &e))?;
        let body: serde_json::Value = serde_json::from_str(body).map_err(|e| invalid(py, "body", e.to_string()))?;
        let mut request =
            aex_core::dispatch::request_of(endpoint, &body, execution_id.as_deref(), passthrough, &self.kernel.config()).map_err(|e| err(py, &e))?;
        if let Some(n) = convert::opt_int(py, "input_tokens", input_tokens)? {
            request.input_tokens = Some(n);
        }
        if let Some(v) = vision {
            request.vision = v;
        }
        detach(py, || self.kernel.admit(token, &request)).map(PyAdmission::from)
    }

    /// Admits a call; `messages` are (role, text) pairs.
    #[pyo3(signature = (token, model, *, messages=None, input_tokens=None, max_output_tokens=None, tools=false, stream=false, vision=false, execution_id=None))]
    fn admit(
        &self,
        py: Python<'_>,
        token: &str,
        model: &str,
        messages: Option<Vec<(String, String)>>,
        input_tokens: Option<&Bound<'_, PyAny>>,
        max_output_tokens: Option<&Bound<'_, PyAny>>,
        tools: bool,
        stream: bool,
        vision: bool,
        execution_id: Option<String>,
    ) -> PyResult<PyAdmission> {
        let request = AdmitRequest {
            execution_id,
            model: model.to_string(),
            input_tokens: convert::opt_int(py, "input_tokens", input_tokens)?,
            max_output_tokens: convert::opt_int(py, "max_output_tokens", max_output_tokens)?,
            messages: messages.unwrap_or_default().into_iter().map(|(role, content)| Message { role, content }).collect(),
            tools,
            streaming: stream,
            vision,
            passthrough: false,
        };
        detach(py, || self.kernel.admit(token, &request)).map(PyAdmission::from)
    }

    /// The call object of an admitted execution (see `Call`).
    fn call(&self, py: Python<'_>, execution_id: &str) -> PyResult<PyCall> {
        let kernel = self.kernel.clone();
        let call = detach(py, || aex_core::call::Call::for_execution(&kernel, execution_id))?;
        Ok(PyCall { call: std::sync::Mutex::new(Some(call)) })
    }

    fn mark_dispatched(&self, py: Python<'_>, execution_id: &str) -> PyResult<()> {
        detach(py, || self.kernel.mark_dispatched(execution_id)).map(drop)
    }

    #[pyo3(signature = (execution_id, input_tokens, output_tokens, cached_input_tokens=None))]
    fn commit_tokens(
        &self,
        py: Python<'_>,
        execution_id: &str,
        input_tokens: &Bound<'_, PyAny>,
        output_tokens: &Bound<'_, PyAny>,
        cached_input_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PySettlement> {
        let usage = Usage {
            input_tokens: convert::int(py, "input_tokens", input_tokens)?,
            output_tokens: convert::int(py, "output_tokens", output_tokens)?,
            cached_input_tokens: convert::opt_int(py, "cached_input_tokens", cached_input_tokens)?.unwrap_or(0),
        };
        detach(py, || self.kernel.commit(execution_id, usage)).map(PySettlement::from)
    }

    /// Settles at a usage counted by the caller because the provider reported none; input is
    /// raised to at least what admission counted, and the ledger marks it estimated.
    fn commit_estimated(
        &self,
        py: Python<'_>,
        execution_id: &str,
        input_tokens: &Bound<'_, PyAny>,
        output_tokens: &Bound<'_, PyAny>,
    ) -> PyResult<PySettlement> {
        let usage = Usage::new(convert::int(py, "input_tokens", input_tokens)?, convert::int(py, "output_tokens", output_tokens)?);
        detach(py, || self.kernel.commit_estimated(execution_id, usage)).map(PySettlement::from)
    }

    #[pyo3(signature = (execution_id, reason=""))]
    fn release(&self, py: Python<'_>, execution_id: &str, reason: &str) -> PyResult<PySettlement> {
        detach(py, || self.kernel.release(execution_id, reason)).map(PySettlement::from)
    }

    #[pyo3(signature = (execution_id, error=""))]
    fn fail(&self, py: Python<'_>, execution_id: &str, error: &str) -> PyResult<PySettlement> {
        detach(py, || self.kernel.fail(execution_id, error)).map(PySettlement::from)
    }

    #[pyo3(signature = (anchor=None))]
    fn audit(&self, py: Python<'_>, anchor: Option<&str>) -> PyResult<Py<PyAny>> {
        let anchor = anchor.map(Head::parse).transpose().map_err(|e| err(py, &e))?;
        let r = detach(py, || self.kernel.audit(anchor.as_ref()))?;
        wire::audit_json(&r).to_py(py)
    }

    /// What is unsafe about the database files' permissions, one sentence each.
    fn warnings(&self) -> Vec<String> {
        self.kernel.warnings()
    }

    fn head(&self, py: Python<'_>) -> PyResult<Option<String>> {
        Ok(detach(py, || self.kernel.head())?.map(|h| h.to_text()))
    }

    fn reload_config(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        detach(py, || self.kernel.reload_config_file(path))
    }

    #[pyo3(signature = (from_seq=1, limit=100))]
    fn events(&self, py: Python<'_>, from_seq: i64, limit: i64) -> PyResult<Py<PyAny>> {
        let from_seq = u64::try_from(from_seq).map_err(|_| invalid(py, "from_seq", format!("must be 0 or more, got {from_seq}")))?;
        let limit = usize::try_from(limit).map_err(|_| invalid(py, "limit", format!("must be 0 or more, got {limit}")))?;
        let events = detach(py, || self.kernel.events(from_seq, limit))?;
        let list: Vec<serde_json::Value> = events.iter().map(wire::event_json).collect();
        serde_json::Value::from(list).to_py(py)
    }

    fn spend_in_window(&self, py: Python<'_>, window_ms: i64) -> PyResult<Py<PyAny>> {
        let spend = detach(py, || self.kernel.spend_in_window(window_ms))?;
        serde_json::to_value(spend).unwrap_or_default().to_py(py)
    }

    fn execution(&self, py: Python<'_>, execution_id: &str) -> PyResult<Py<PyAny>> {
        let e = detach(py, || self.kernel.execution(execution_id))?;
        wire::execution_json(&e).to_py(py)
    }

    fn config_hash(&self) -> String {
        self.kernel.config().hash_hex()
    }

    fn models(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        config_json(&self.kernel.config()).to_py(py)
    }

    /// The database's schema version (opening migrates it to this aex's).
    fn schema_version(&self) -> u32 {
        self.kernel.schema_version()
    }

    fn now_ms(&self) -> i64 {
        self.kernel.now_ms()
    }

    /// One governed provider call: `body` is the OpenAI-style request JSON for `endpoint`
    /// ("chat", "responses", "embeddings"); returns the provider's response JSON, unchanged.
    /// `cancel` (a `Cancel`) stops it from another thread; Ctrl-C does too (see `governed`).
    #[pyo3(signature = (token, endpoint, body, *, passthrough_key=None, execution_id=None, cancel=None))]
    fn call_provider(
        &self,
        py: Python<'_>,
        token: &str,
        endpoint: &str,
        body: &str,
        passthrough_key: Option<String>,
        execution_id: Option<String>,
        cancel: Option<PyRef<'_, PyCancel>>,
    ) -> PyResult<String> {
        let call = provider_call(py, endpoint, body, passthrough_key, execution_id, cancel)?;
        governed(py, &self.kernel, token, call, None).map(|r| r.raw)
    }

    /// A streaming governed call: `on_chunk(data)` receives each SSE payload (a JSON string)
    /// and returns False to stop. Returns the settlement. `cancel` as for `call_provider`.
    #[pyo3(signature = (token, endpoint, body, on_chunk, *, passthrough_key=None, execution_id=None, cancel=None))]
    fn stream_provider(
        &self,
        py: Python<'_>,
        token: &str,
        endpoint: &str,
        body: &str,
        on_chunk: Py<PyAny>,
        passthrough_key: Option<String>,
        execution_id: Option<String>,
        cancel: Option<PyRef<'_, PyCancel>>,
    ) -> PyResult<PySettlement> {
        let call = provider_call(py, endpoint, body, passthrough_key, execution_id, cancel)?;
        governed(py, &self.kernel, token, call, Some(&on_chunk)).map(|r| PySettlement::from(r.settlement))
    }

    /// Runs the OpenAI-compatible gateway (`aex_serve`) over this kernel until a signal handler
    /// raises (Ctrl-C's `KeyboardInterrupt`; install one for SIGTERM), then shuts it down
    /// gracefully (calls in flight finish within `shutdown_grace_ms`, the rest are cancelled and
    /// settled) and raises that exception. Blocks with the GIL released; `ready(url)` is called
    /// once it listens. Refuses a non-loopback `host` without `admin_token` (`InvalidRequest`).
    #[pyo3(signature = (host="127.0.0.1", port=9000, *, admin_token=None, config_path=None, ready=None, shutdown_grace_ms=30_000))]
    fn serve(
        &self,
        py: Python<'_>,
        host: &str,
        port: u16,
        admin_token: Option<String>,
        config_path: Option<std::path::PathBuf>,
        ready: Option<Py<PyAny>>,
        shutdown_grace_ms: u64,
    ) -> PyResult<()> {
        let ip: std::net::IpAddr = host.parse().map_err(|_| invalid(py, "host", format!("must be an IP address, got '{host}'")))?;
        let options = aex_serve::ServeOptions {
            addr: std::net::SocketAddr::new(ip, port),
            admin_token,
            config_path,
            shutdown_grace: std::time::Duration::from_millis(shutdown_grace_ms),
            ..aex_serve::ServeOptions::default()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(aex_serve::WORKER_THREADS)
            .thread_name("aex-serve")
            .enable_all()
            .build()
            .map_err(|e| err(py, &aex_core::Error::Unavailable(format!("cannot start the server runtime: {e}"))))?;
        let mut stopped_by: Option<PyErr> = None;
        let result = py.detach(|| {
            runtime.block_on(async {
                let gateway = aex_serve::Gateway::bind(self.kernel.clone(), options).await?;
                let url = format!("http://{}/v1", gateway.local_addr()?);
                if let Some(ready) = &ready
                    && let Err(e) = Python::attach(|py| ready.call1(py, (url,)).map(drop))
                {
                    stopped_by = Some(e);
                    return Ok(());
                }
                gateway
                    .run(async {
                        let mut tick = tokio::time::interval(SIGNAL_POLL);
                        loop {
                            tick.tick().await;
                            if let Err(e) = Python::attach(|py| py.check_signals()) {
                                stopped_by = Some(e);
                                return;
                            }
                        }
                    })
                    .await
            })
        });
        result.map_err(|e| err(py, &e))?;
        stopped_by.map_or(Ok(()), Err)
    }

    /// For benchmarks: `n` admit + commit calls made from Rust on this kernel, with the GIL
    /// released; returns the seconds they took. The same work as the Python calls, without Python.
    fn _bench_native(&self, py: Python<'_>, token: &str, model: &str, n: usize) -> PyResult<f64> {
        let request = AdmitRequest::new(model).input_tokens(1_200).max_output_tokens(256);
        detach(py, || {
            let start = std::time::Instant::now();
            for _ in 0..n {
                let a = self.kernel.admit(token, &request)?;
                self.kernel.commit(&a.execution_id, Usage::new(1_200, 180))?;
            }
            Ok(start.elapsed().as_secs_f64())
        })
    }
}

fn provider_call(
    py: Python<'_>,
    endpoint: &str,
    body: &str,
    passthrough_key: Option<String>,
    execution_id: Option<String>,
    cancel: Option<PyRef<'_, PyCancel>>,
) -> PyResult<aex_core::dispatch::ProviderCall> {
    let endpoint = aex_core::dispatch::Endpoint::parse(endpoint).map_err(|e| err(py, &e))?;
    let body: serde_json::Value = serde_json::from_str(body).map_err(|e| invalid(py, "body", e.to_string()))?;
    let mut call = aex_core::dispatch::ProviderCall::new(endpoint, body);
    call.passthrough_key = passthrough_key;
    call.execution_id = execution_id;
    if let Some(c) = cancel {
        call.cancel = c.0.clone();
    }
    Ok(call)
}

/// How often a governed call in progress looks for a signal (Ctrl-C) to act on.
const SIGNAL_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Runs one governed call (streamed when `on_chunk` is given) with the GIL released. Meanwhile
/// it looks for a pending signal every [`SIGNAL_POLL`] (Python runs signal handlers on the main
/// thread only; elsewhere this finds none): a handler that raises (Ctrl-C's
/// `KeyboardInterrupt`) cancels the call, which settles by the money rules at once, and its
/// exception is raised when the call has settled. An exception raised by `on_chunk` stops the
/// stream the same way and is raised. A failure is raised as the `aex.errors` exception with
/// `execution_id` and `settlement` set when an attempt was admitted.
fn governed(
    py: Python<'_>,
    kernel: &Kernel,
    token: &str,
    call: aex_core::dispatch::ProviderCall,
    on_chunk: Option<&Py<PyAny>>,
) -> PyResult<aex_core::dispatch::ProviderReply> {
    let cancel = call.cancel.clone();
    let mut interrupted: Option<PyErr> = None;
    let mut callback_error: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut on_data = |data: &str| {
            let Some(on_chunk) = on_chunk else { return false };
            Python::attach(|py| match on_chunk.call1(py, (data,)).and_then(|r| r.is_truthy(py)) {
                Ok(go_on) => go_on,
                Err(e) => {
                    callback_error = Some(e);
                    false
                }
            })
        };
        let work = async {
            match on_chunk {
                Some(_) => kernel.stream_provider(token, call, &mut on_data).await,
                None => kernel.call_provider(token, call).await,
            }
        };
        let watch = async {
            let mut tick = tokio::time::interval(SIGNAL_POLL);
            loop {
                tick.tick().await;
                if let Err(e) = Python::attach(|py| py.check_signals()) {
                    return e;
                }
            }
        };
        kernel.block_on(async {
            tokio::pin!(work);
            tokio::select! {
                r = &mut work => r,
                e = watch => {
                    interrupted = Some(e);
                    cancel.cancel();
                    work.await
                }
            }
        })
    });
    if let Some(e) = interrupted.or(callback_error) {
        return Err(e);
    }
    match result {
        Err(e) => Err(err(py, &e)),
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(failure)) => {
            let e = err(py, &failure.error);
            let value = e.value(py);
            value.setattr("execution_id", failure.execution_id)?;
            value.setattr("settlement", failure.settlement.map(PySettlement::from))?;
            Err(e)
        }
    }
}

/// Cancels a governed call (`Kernel.call_provider` / `stream_provider`) from another thread:
/// the call stops wherever it waits and settles by the money rules (released if nothing was
/// sent, else charged from the counted output, or at the full reservation). Thread-safe.
#[pyclass(frozen, name = "Cancel", module = "aex._aex")]
struct PyCancel(aex_core::dispatch::Cancel);

#[pymethods]
impl PyCancel {
    #[new]
    fn new() -> Self {
        PyCancel(aex_core::dispatch::Cancel::new())
    }

    /// Cancels the call (idempotent).
    fn cancel(&self) {
        self.0.cancel();
    }

    /// Whether `cancel()` was called.
    #[getter]
    fn cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

fn config_json(c: &Config) -> serde_json::Value {
    let models: serde_json::Map<String, serde_json::Value> = c
        .models()
        .map(|(name, m)| {
            (name.to_string(), serde_json::json!({
                "provider": m.provider,
                "input_micro_per_mtok": m.prices.map(|p| p.input),
                "output_micro_per_mtok": m.prices.map(|p| p.output),
                "max_output_tokens": m.max_output_tokens,
                "context_window": m.context_window,
                "tools": m.capabilities.tools, "vision": m.capabilities.vision, "streaming": m.capabilities.streaming,
            }))
        })
        .collect();
    let providers: serde_json::Map<String, serde_json::Value> =
        c.providers().map(|(name, p)| (name.to_string(), serde_json::json!({"base_url": p.base_url, "api_key_env": p.api_key_env}))).collect();
    serde_json::json!({ "hash": c.hash_hex(), "models": models, "providers": providers })
}

/// Parses and validates a `models.yaml` without opening a kernel; returns its models and hash.
#[pyfunction]
fn check_config(py: Python<'_>, path: &str) -> PyResult<Py<PyAny>> {
    let c = Config::load(path).map_err(|e| err(py, &e))?;
    config_json(&c).to_py(py)
}

/// Exact micro-USD of a USD amount (text, int, float rounded to the nearest micro, Decimal).
#[pyfunction]
fn usd_to_micro(py: Python<'_>, usd: &Bound<'_, PyAny>) -> PyResult<i64> {
    amount_micro(py, "usd", usd)
}

/// Tokens of `text` on `model`: the real tokenizer for OpenAI models, the UTF-8 byte length (an
/// upper bound for byte-level BPE) for others.
#[pyfunction]
fn count_tokens(model: &str, text: &str) -> i64 {
    aex_core::admission::count_text_tokens(model, text)
}

/// Micro-USD as USD text ("0.01", "0.000001").
#[pyfunction]
fn format_usd(micro: i64) -> String {
    aex_core::money::format_usd(micro)
}

#[pymodule]
fn _aex(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", aex_core::VERSION)?;
    m.add_class::<Kernel_>()?;
    m.add_class::<PyAdmission>()?;
    m.add_class::<PySettlement>()?;
    m.add_class::<PyCall>()?;
    m.add_class::<PyCancel>()?;
    m.add_function(wrap_pyfunction!(check_config, m)?)?;
    m.add_function(wrap_pyfunction!(usd_to_micro, m)?)?;
    m.add_function(wrap_pyfunction!(format_usd, m)?)?;
    m.add_function(wrap_pyfunction!(count_tokens, m)?)?;
    Ok(())
}
