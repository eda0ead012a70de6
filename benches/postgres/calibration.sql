-- One admit + commit as the fleet store sends it, for pgbench (libpq, C): the same statements,
-- pipelined into the same five round trips, on the same schema (made by aex). What a minimal
-- client reaches with them is the floor of what the store can reach on a machine.
\set a :client_id + 1
\set n random(1, 9000000000000000000)
\set now 1767225600000
-- admit: the lock, the ledger's head, the execution by id (idempotency), the agent
\startpipeline
BEGIN;
SELECT pg_advisory_xact_lock(6382968);
SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1;
SELECT id, agent_id, agent, request_hash, state, model, input_tokens, max_output_tokens, input_price, output_price, cached_input_price, reserved_micro, cost_micro, usage_input, usage_output, usage_cached_input, reason, created_at_ms, expires_at_ms, dispatched_at_ms, settled_at_ms, teams, rate_scopes, rate_tokens FROM executions WHERE id = 'cal-' || :n;
SELECT id, name, token_prefix, scope, ttl_ms, expires_at_ms, disabled, budget_micro, spent_micro, reserved_micro, rpm, tpm, allowed_models, allow_tools, allow_streaming, allow_vision, strict, allow_passthrough, max_concurrent, budget_period, period_start_ms, team_id, (SELECT t.name FROM teams t WHERE t.id = agents.team_id) AS team_name, created_at_ms, token_hash, seal, seal_tag FROM agents WHERE id = :a;
\endpipeline
-- admit: the agent's reservations past their TTL
SELECT id, agent_id, agent, request_hash, state, model, input_tokens, max_output_tokens, input_price, output_price, cached_input_price, reserved_micro, cost_micro, usage_input, usage_output, usage_cached_input, reason, created_at_ms, expires_at_ms, dispatched_at_ms, settled_at_ms, teams, rate_scopes, rate_tokens FROM executions WHERE state IN ('RESERVED', 'DISPATCHED') AND expires_at_ms <= :now AND agent_id = :a ORDER BY expires_at_ms, id;
-- admit: the writes and the commit
\startpipeline
INSERT INTO executions (id, agent_id, agent, request_hash, state, model, input_tokens, max_output_tokens, input_price, output_price, cached_input_price, reserved_micro, created_at_ms, expires_at_ms, teams, rate_scopes, rate_tokens) VALUES ('cal-' || :n, :a, 'agent', '\x0102030405060708091011121314151617181920212223242526272829303132', 'RESERVED', 'gpt-4o-mini', 1200, 256, 150000, 600000, NULL, 334, :now, :now::bigint + 900000, '', '', 1456);
UPDATE agents SET spent_micro = spent_micro, reserved_micro = reserved_micro + 334, seal = seal, seal_tag = seal_tag WHERE id = :a;
INSERT INTO ledger (seq, ts_ms, kind, agent, execution_id, amount_micro, data, prev_hash, hash) SELECT coalesce(max(seq), 0) + 1, :now, 'execution.reserved', 'agent', 'cal-' || :n, 334, '{"model": "gpt-4o-mini","input_tokens": 1200,"max_output_tokens": 256,"teams": []}', '\x0102030405060708091011121314151617181920212223242526272829303132', '\x0102030405060708091011121314151617181920212223242526272829303132' FROM ledger;
COMMIT;
\endpipeline
-- commit: the lock, the head, the execution and its agent
\startpipeline
BEGIN;
SELECT pg_advisory_xact_lock(6382968);
SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1;
SELECT id, agent_id, agent, request_hash, state, model, input_tokens, max_output_tokens, input_price, output_price, cached_input_price, reserved_micro, cost_micro, usage_input, usage_output, usage_cached_input, reason, created_at_ms, expires_at_ms, dispatched_at_ms, settled_at_ms, teams, rate_scopes, rate_tokens FROM executions WHERE id = 'cal-' || :n;
SELECT id, name, token_prefix, scope, ttl_ms, expires_at_ms, disabled, budget_micro, spent_micro, reserved_micro, rpm, tpm, allowed_models, allow_tools, allow_streaming, allow_vision, strict, allow_passthrough, max_concurrent, budget_period, period_start_ms, team_id, (SELECT t.name FROM teams t WHERE t.id = agents.team_id) AS team_name, created_at_ms, token_hash, seal, seal_tag FROM agents WHERE id = (SELECT agent_id FROM executions WHERE id = 'cal-' || :n);
\endpipeline
-- commit: the writes and the commit
\startpipeline
UPDATE executions SET state = 'COMMITTED', cost_micro = 288, usage_input = 1200, usage_output = 180, usage_cached_input = 0, reason = NULL, dispatched_at_ms = NULL, settled_at_ms = :now WHERE id = 'cal-' || :n;
UPDATE agents SET spent_micro = spent_micro + 288, reserved_micro = reserved_micro - 334, seal = seal, seal_tag = seal_tag WHERE id = :a;
INSERT INTO ledger (seq, ts_ms, kind, agent, execution_id, amount_micro, data, prev_hash, hash) SELECT coalesce(max(seq), 0) + 1, :now, 'execution.committed', 'agent', 'cal-' || :n, 288, '{"reserved_micro": 334,"input_tokens": 1200,"output_tokens": 180,"cached_input_tokens": 0,"estimated": false}', '\x0102030405060708091011121314151617181920212223242526272829303132', '\x0102030405060708091011121314151617181920212223242526272829303132' FROM ledger;
COMMIT;
\endpipeline
