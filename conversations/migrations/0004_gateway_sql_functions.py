"""Postgres functions for the gateway's two writes per call.

Opening a call (budget holds, conversation, call, request messages) and
finishing it (the call's outcome, settlement, answer, conversation totals) each
run as one function call: one round trip, and budget period rows locked only
for the microseconds the function runs plus the commit. The ORM versions in
conversations/services.py and budgets/services.py are the reference and what
SQLite runs; tests/test_recording_sql.py runs both and compares the rows.

The batch forms (gateway_open_calls, gateway_finish_calls) take several
requests' writes in one transaction, one round trip and one WAL flush (group
commit, conversations/group_commit.py). Each item is still processed by the
single-call function, in order, so a batch writes exactly what the same calls
one after another would. Deadlocks between concurrent batches are ruled out
the usual way: every budget period row the batch touches is locked first, in
id order, and the caller orders the items by conversation.

plan_cache_mode = force_generic_plan: PL/pgSQL otherwise re-planned most of
these statements on every call (custom plans win the plan cache's cost
comparison for parameterised single-row statements), and planning was about
an eighth of the database's CPU per request under load. The statements are
keyed lookups and inserts whose best plan does not depend on the values.
enable_seqscan = off goes with it: a generic plan is made once per connection,
and one made while a table was nearly empty (a fresh install, before the first
ANALYZE) would keep scanning it sequentially as it grows. Every lookup here
has an index, which is always the right access path for one row.

Snapshotted here (not read from a file) so this migration never changes.
"""

from django.db import migrations

PERIOD_IDS = r"""
CREATE OR REPLACE FUNCTION gateway_period_ids(budgets jsonb) RETURNS bigint[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- The accounting row of each {budget_id, subject, period_start, period_end},
-- found or created (concurrent first requests converge on one row); each id once.
DECLARE
  b record;
  pid bigint;
  period_ids bigint[] := '{}';
BEGIN
  FOR b IN SELECT * FROM jsonb_to_recordset(coalesce(budgets, '[]'::jsonb))
           AS x(budget_id bigint, subject text, period_start timestamptz, period_end timestamptz)
  LOOP
    SELECT id INTO pid FROM budgets_budgetperiod
     WHERE budget_id = b.budget_id AND subject = b.subject AND period_start = b.period_start;
    IF pid IS NULL THEN
      INSERT INTO budgets_budgetperiod
        (budget_id, subject, period_start, period_end, spent_usd, reserved_usd, spent_tokens, reserved_tokens, warned_at_percent)
      VALUES (b.budget_id, b.subject, b.period_start, b.period_end, 0, 0, 0, 0, 0)
      ON CONFLICT (budget_id, subject, period_start) DO NOTHING
      RETURNING id INTO pid;
      IF pid IS NULL THEN  -- a concurrent first request created it
        SELECT id INTO pid FROM budgets_budgetperiod
         WHERE budget_id = b.budget_id AND subject = b.subject AND period_start = b.period_start;
      END IF;
    END IF;
    IF NOT pid = ANY(period_ids) THEN
      period_ids := period_ids || pid;
    END IF;
  END LOOP;
  RETURN period_ids;
END
$fn$;
"""

OPEN_CALL = r"""
CREATE OR REPLACE FUNCTION gateway_open_call(p jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
DECLARE
  now_ts timestamptz := (p->>'now')::timestamptz;
  hold_usd numeric := coalesce((p->>'hold_usd')::numeric, 0);
  hold_tokens bigint := coalesce((p->>'hold_tokens')::bigint, 0);
  per record;
  period_ids bigint[];
  conv_id bigint;
  new_call_id bigint;
  periods jsonb := '[]'::jsonb;
BEGIN
  -- Budget periods: find or create each, then lock them in id order (no
  -- deadlocks) and check the hard caps before anything is written.
  period_ids := gateway_period_ids(p->'budgets');

  IF cardinality(period_ids) > 0 THEN
    FOR per IN
      SELECT bp.id, bp.budget_id, bp.spent_usd, bp.reserved_usd, bp.spent_tokens, bp.reserved_tokens,
             bu.hard_cap, bu.limit_usd, bu.limit_tokens
        FROM budgets_budgetperiod bp JOIN budgets_budget bu ON bu.id = bp.budget_id
       WHERE bp.id = ANY(period_ids) ORDER BY bp.id FOR UPDATE OF bp
    LOOP
      IF per.hard_cap AND per.limit_usd IS NOT NULL
         AND per.spent_usd + per.reserved_usd + hold_usd > per.limit_usd THEN
        RETURN jsonb_build_object('exceeded', jsonb_build_object(
          'budget_id', per.budget_id, 'period_id', per.id, 'unit', 'usd',
          'spent_usd', per.spent_usd::text, 'reserved_usd', per.reserved_usd::text,
          'spent_tokens', per.spent_tokens, 'reserved_tokens', per.reserved_tokens));
      END IF;
      IF per.hard_cap AND per.limit_tokens IS NOT NULL
         AND per.spent_tokens + per.reserved_tokens + hold_tokens > per.limit_tokens THEN
        RETURN jsonb_build_object('exceeded', jsonb_build_object(
          'budget_id', per.budget_id, 'period_id', per.id, 'unit', 'tokens',
          'spent_usd', per.spent_usd::text, 'reserved_usd', per.reserved_usd::text,
          'spent_tokens', per.spent_tokens, 'reserved_tokens', per.reserved_tokens));
      END IF;
    END LOOP;
  END IF;

  -- An existing conversation is only read: its last activity moves when the
  -- call finishes. A new one is inserted; concurrent first requests converge.
  SELECT id INTO conv_id FROM conversations_conversation
   WHERE application_id = (p->>'application_id')::bigint AND external_id = p->>'external_id';
  IF conv_id IS NULL THEN
    INSERT INTO conversations_conversation
      (application_id, external_id, end_user, title, started_at, last_activity_at, call_count, total_tokens, total_cost_usd)
    VALUES ((p->>'application_id')::bigint, p->>'external_id', p->>'end_user', p->>'title', now_ts, now_ts, 0, 0, 0)
    ON CONFLICT (application_id, external_id) DO UPDATE SET last_activity_at = EXCLUDED.last_activity_at
    RETURNING id INTO conv_id;
  END IF;

  INSERT INTO conversations_providercall
    (request_id, application_id, api_key_id, key_prefix, conversation_id, end_user, step, endpoint, stream,
     model_requested, model_used, parameters, status, outcome, error_type, error_code, error_message,
     decisions, attempts, estimated_prompt_tokens, token_count_is_estimate, usage_source, price_id,
     provider_base_url, provider_response_id, finish_reason, created_at)
  VALUES
    (p->>'request_id', (p->>'application_id')::bigint, (p->>'api_key_id')::bigint, p->>'key_prefix', conv_id,
     p->>'end_user', p->>'step', 'chat.completions', (p->>'stream')::boolean,
     p->>'model_requested', p->>'model_used', p->'parameters', 'in_progress', '', '', '', '',
     p->'decisions', '[]'::jsonb, (p->>'estimated_prompt_tokens')::int, (p->>'token_count_is_estimate')::boolean,
     'none', (p->>'price_id')::bigint, p->>'provider_base_url', '', '', now_ts)
  RETURNING id INTO new_call_id;

  INSERT INTO conversations_message
    (conversation_id, call_id, direction, position, role, name, content, parts, content_sha256, created_at)
  SELECT conv_id, new_call_id, 'request', m.position, m.role, m.name, m.content, m.parts, m.sha, now_ts
    FROM jsonb_to_recordset(p->'messages') AS m(position int, role text, name text, content text, parts jsonb, sha text);

  IF cardinality(period_ids) > 0 THEN
    WITH held AS (
      UPDATE budgets_budgetperiod
         SET reserved_usd = reserved_usd + hold_usd, reserved_tokens = reserved_tokens + hold_tokens
       WHERE id = ANY(period_ids)
       RETURNING *
    )
    SELECT jsonb_agg(jsonb_build_object(
             'id', held.id, 'budget_id', held.budget_id,
             'spent_usd', held.spent_usd::text, 'reserved_usd', held.reserved_usd::text,
             'spent_tokens', held.spent_tokens, 'reserved_tokens', held.reserved_tokens,
             'warned_at_percent', held.warned_at_percent) ORDER BY held.id)
      INTO periods FROM held;
    INSERT INTO budgets_reservation (call_id, budget_period_id, amount_usd, tokens, status, created_at, expires_at)
    SELECT new_call_id, pid_, hold_usd, hold_tokens, 'held', now_ts, (p->>'expires_at')::timestamptz
      FROM unnest(period_ids) AS pid_;
  END IF;

  RETURN jsonb_build_object('call_id', new_call_id, 'conversation_id', conv_id, 'periods', periods);
END
$fn$;
"""

FINISH_CALL = r"""
CREATE OR REPLACE FUNCTION gateway_finish_call(p jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
DECLARE
  now_ts timestamptz := (p->>'now')::timestamptz;
  cid bigint := (p->>'call_id')::bigint;
  cost numeric := (p->>'cost_usd')::numeric;
  total bigint := (p->>'total_tokens')::bigint;
  settling boolean := (p->>'cost_usd') IS NOT NULL;
  updated int;
  states text[];
  r record;
  period_ids bigint[];
  periods jsonb := '[]'::jsonb;
BEGIN
  UPDATE conversations_providercall SET
    model_used = coalesce(p->>'model_used', model_used),
    price_id = coalesce((p->>'price_id')::bigint, price_id),
    attempts = p->'attempts',
    status = p->>'status',
    outcome = p->>'outcome',
    http_status = (p->>'http_status')::int,
    error_type = p->>'error_type',
    error_code = p->>'error_code',
    error_message = p->>'error_message',
    prompt_tokens = (p->>'prompt_tokens')::int,
    completion_tokens = (p->>'completion_tokens')::int,
    cached_tokens = (p->>'cached_tokens')::int,
    reasoning_tokens = (p->>'reasoning_tokens')::int,
    total_tokens = total,
    usage_source = p->>'usage_source',
    cost_usd = cost,
    finish_reason = p->>'finish_reason',
    provider_response_id = p->>'provider_response_id',
    decisions = p->'decisions',
    latency_ms = (p->>'latency_ms')::int,
    provider_latency_ms = (p->>'provider_latency_ms')::int,
    completed_at = now_ts
  WHERE id = cid AND status = 'in_progress';
  GET DIAGNOSTICS updated = ROW_COUNT;

  -- Charge what the provider reported (even on a call the reaper already
  -- closed: the work was done), or release the holds of a call that cost nothing.
  IF (p->>'has_holds')::boolean THEN
    states := CASE WHEN settling THEN ARRAY['held', 'expired'] ELSE ARRAY['held'] END;
    SELECT array_agg(DISTINCT budget_period_id) INTO period_ids
      FROM budgets_reservation WHERE call_id = cid AND status = ANY(states);
    IF period_ids IS NOT NULL THEN
      PERFORM 1 FROM budgets_budgetperiod WHERE id = ANY(period_ids) ORDER BY id FOR UPDATE;
      FOR r IN SELECT id, budget_period_id, amount_usd, tokens, status
                 FROM budgets_reservation WHERE call_id = cid AND status = ANY(states)
      LOOP
        UPDATE budgets_reservation SET
          status = CASE WHEN settling THEN 'settled' ELSE 'released' END,
          closed_at = now_ts,
          settled_usd = CASE WHEN settling THEN cost ELSE settled_usd END,
          settled_tokens = CASE WHEN settling THEN coalesce(total, 0) ELSE settled_tokens END
        WHERE id = r.id AND status = r.status;
        IF FOUND THEN
          UPDATE budgets_budgetperiod SET
            reserved_usd = reserved_usd - CASE WHEN r.status = 'held' THEN r.amount_usd ELSE 0 END,
            reserved_tokens = reserved_tokens - CASE WHEN r.status = 'held' THEN r.tokens ELSE 0 END,
            spent_usd = spent_usd + coalesce(cost, 0),
            spent_tokens = spent_tokens + CASE WHEN settling THEN coalesce(total, 0) ELSE 0 END
          WHERE id = r.budget_period_id;
        END IF;
      END LOOP;
      SELECT jsonb_agg(jsonb_build_object(
               'id', bp.id, 'budget_id', bp.budget_id,
               'spent_usd', bp.spent_usd::text, 'reserved_usd', bp.reserved_usd::text,
               'spent_tokens', bp.spent_tokens, 'reserved_tokens', bp.reserved_tokens,
               'warned_at_percent', bp.warned_at_percent) ORDER BY bp.id)
        INTO periods FROM budgets_budgetperiod bp WHERE bp.id = ANY(period_ids);
    END IF;
  END IF;

  IF updated = 1 THEN
    IF p ? 'answer' THEN
      INSERT INTO conversations_message
        (conversation_id, call_id, direction, position, role, name, content, parts, content_sha256, created_at)
      VALUES ((p->>'conversation_id')::bigint, cid, 'response', 0, 'assistant', '',
              p->'answer'->>'content', p->'answer'->'parts', p->'answer'->>'sha', now_ts);
    END IF;
    UPDATE conversations_conversation SET
      last_activity_at = now_ts,
      call_count = call_count + 1,
      total_tokens = total_tokens + coalesce(total, 0),
      total_cost_usd = total_cost_usd + coalesce(cost, 0)
    WHERE id = (p->>'conversation_id')::bigint;
  END IF;

  RETURN jsonb_build_object('recorded', updated = 1, 'settled', settling, 'periods', coalesce(periods, '[]'::jsonb));
END
$fn$;
"""

OPEN_CALLS = r"""
CREATE OR REPLACE FUNCTION gateway_open_calls(items jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
DECLARE
  period_ids bigint[];
  item jsonb;
  results jsonb := '[]'::jsonb;
BEGIN
  period_ids := gateway_period_ids(
    (SELECT jsonb_agg(x.value) FROM jsonb_array_elements(items) AS i(value),
            jsonb_array_elements(coalesce(i.value->'budgets', '[]'::jsonb)) AS x(value)));
  IF cardinality(period_ids) > 0 THEN
    PERFORM 1 FROM budgets_budgetperiod WHERE id = ANY(period_ids) ORDER BY id FOR UPDATE;
  END IF;
  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, n) ORDER BY e.n
  LOOP
    results := results || jsonb_build_array(gateway_open_call(item));
  END LOOP;
  RETURN results;
END
$fn$;
"""

FINISH_CALLS = r"""
CREATE OR REPLACE FUNCTION gateway_finish_calls(items jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
DECLARE
  period_ids bigint[];
  item jsonb;
  results jsonb := '[]'::jsonb;
BEGIN
  SELECT array_agg(DISTINCT r.budget_period_id) INTO period_ids
    FROM budgets_reservation r
   WHERE r.call_id IN (SELECT (i.value->>'call_id')::bigint FROM jsonb_array_elements(items) AS i(value)
                        WHERE (i.value->>'has_holds')::boolean)
     AND r.status IN ('held', 'expired');
  IF period_ids IS NOT NULL THEN
    PERFORM 1 FROM budgets_budgetperiod WHERE id = ANY(period_ids) ORDER BY id FOR UPDATE;
  END IF;
  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, n) ORDER BY e.n
  LOOP
    results := results || jsonb_build_array(gateway_finish_call(item));
  END LOOP;
  RETURN results;
END
$fn$;
"""

DROP = ";".join(
    f"DROP FUNCTION IF EXISTS {fn}(jsonb)"
    for fn in ("gateway_open_calls", "gateway_finish_calls", "gateway_open_call", "gateway_finish_call", "gateway_period_ids")
)


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for sql in (PERIOD_IDS, OPEN_CALL, FINISH_CALL, OPEN_CALLS, FINISH_CALLS):
            schema_editor.execute(sql)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0003_answer_flags"),
        ("budgets", "0003_protect_cost_events"),
    ]

    operations = [migrations.RunPython(create, drop)]
