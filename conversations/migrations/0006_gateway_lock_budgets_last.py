"""Budget period rows locked last, not first.

Every request of an application touches the same budget period rows, so the
time they stay locked is time no other request's write can proceed. The
functions of migration 0004 locked them before doing anything else and kept
them through every insert and update of the call, and the batch forms through
every item of the batch: the database's whole work per request (about 1 ms)
ran one request at a time, and at c=200 with 500 ms provider latency the
period rows were locked 93 % of the time.

Now the writes that need no budget lock come first, without it: the call,
its conversation and its messages at open; the call's outcome, the answer and
the conversation's totals at finish. Only the holds (check and reserve) and
the settlement run under the lock, just before the commit. The rows written
are the same, in the same transaction.

The hard cap at open is checked twice: before the inserts without the lock
(a request that would exceed is refused at once, nothing written), and again
under the lock. If a concurrent request took the headroom in between, the
function raises SQLSTATE GW001 and its transaction rolls back: the caller
writes the request again with lock_first set, which locks the period rows
before the check as 0004 did (conversations/recording_sql.py). A call is
never recorded as refused when it was opened, nor opened over the cap.

Snapshotted here (not read from a file) so this migration never changes.
"""

import importlib

from django.db import migrations

BUDGET_EXCESS = r"""
CREATE OR REPLACE FUNCTION gateway_budget_excess(period_ids bigint[], hold_usd numeric, hold_tokens bigint)
RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- The first hard cap (in id order) that these holds would exceed, or NULL.
-- Reads the latest committed rows; the caller decides whether it holds the locks.
DECLARE
  per record;
BEGIN
  FOR per IN
    SELECT bp.id, bp.budget_id, bp.spent_usd, bp.reserved_usd, bp.spent_tokens, bp.reserved_tokens,
           bu.hard_cap, bu.limit_usd, bu.limit_tokens
      FROM budgets_budgetperiod bp JOIN budgets_budget bu ON bu.id = bp.budget_id
     WHERE bp.id = ANY(period_ids) ORDER BY bp.id
  LOOP
    IF per.hard_cap AND per.limit_usd IS NOT NULL
       AND per.spent_usd + per.reserved_usd + hold_usd > per.limit_usd THEN
      RETURN jsonb_build_object(
        'budget_id', per.budget_id, 'period_id', per.id, 'unit', 'usd',
        'spent_usd', per.spent_usd::text, 'reserved_usd', per.reserved_usd::text,
        'spent_tokens', per.spent_tokens, 'reserved_tokens', per.reserved_tokens);
    END IF;
    IF per.hard_cap AND per.limit_tokens IS NOT NULL
       AND per.spent_tokens + per.reserved_tokens + hold_tokens > per.limit_tokens THEN
      RETURN jsonb_build_object(
        'budget_id', per.budget_id, 'period_id', per.id, 'unit', 'tokens',
        'spent_usd', per.spent_usd::text, 'reserved_usd', per.reserved_usd::text,
        'spent_tokens', per.spent_tokens, 'reserved_tokens', per.reserved_tokens);
    END IF;
  END LOOP;
  RETURN NULL;
END
$fn$;
"""

OPEN_INSERT = r"""
CREATE OR REPLACE FUNCTION gateway_open_insert(p jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- Everything of opening a call that needs no budget lock: the first cap check,
-- the conversation, the call and its request messages.
DECLARE
  now_ts timestamptz := (p->>'now')::timestamptz;
  period_ids bigint[];
  excess jsonb;
  conv_id bigint;
  new_call_id bigint;
BEGIN
  period_ids := gateway_period_ids(p->'budgets');
  IF cardinality(period_ids) > 0 THEN
    IF coalesce((p->>'lock_first')::boolean, false) THEN
      PERFORM 1 FROM budgets_budgetperiod WHERE id = ANY(period_ids) ORDER BY id FOR UPDATE;
    END IF;
    excess := gateway_budget_excess(period_ids, coalesce((p->>'hold_usd')::numeric, 0),
                                    coalesce((p->>'hold_tokens')::bigint, 0));
    IF excess IS NOT NULL THEN
      RETURN jsonb_build_object('exceeded', excess);
    END IF;
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

  RETURN jsonb_build_object('call_id', new_call_id, 'conversation_id', conv_id, 'period_ids', to_jsonb(period_ids));
END
$fn$;
"""

OPEN_RESERVE = r"""
CREATE OR REPLACE FUNCTION gateway_open_reserve(p jsonb, call_id bigint, period_ids bigint[]) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- The holds of an inserted call, under the period locks (taken here in id
-- order; a batch has already taken them all). Raises GW001 if a cap filled up
-- since gateway_open_insert looked: the transaction must not commit.
DECLARE
  hold_usd numeric := coalesce((p->>'hold_usd')::numeric, 0);
  hold_tokens bigint := coalesce((p->>'hold_tokens')::bigint, 0);
  periods jsonb;
BEGIN
  IF cardinality(period_ids) = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  PERFORM 1 FROM budgets_budgetperiod WHERE id = ANY(period_ids) ORDER BY id FOR UPDATE;
  IF gateway_budget_excess(period_ids, hold_usd, hold_tokens) IS NOT NULL THEN
    RAISE EXCEPTION 'a budget filled up while the call was being opened; open it again with lock_first'
      USING ERRCODE = 'GW001';
  END IF;
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
  SELECT call_id, pid_, hold_usd, hold_tokens, 'held', (p->>'now')::timestamptz, (p->>'expires_at')::timestamptz
    FROM unnest(period_ids) AS pid_;
  RETURN periods;
END
$fn$;
"""

OPEN_CALL = r"""
CREATE OR REPLACE FUNCTION gateway_open_call(p jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
DECLARE
  opened jsonb;
BEGIN
  opened := gateway_open_insert(p);
  IF opened ? 'exceeded' THEN
    RETURN opened;
  END IF;
  RETURN jsonb_build_object(
    'call_id', opened->'call_id', 'conversation_id', opened->'conversation_id',
    'periods', gateway_open_reserve(p, (opened->>'call_id')::bigint,
                                    ARRAY(SELECT jsonb_array_elements_text(opened->'period_ids')::bigint)));
END
$fn$;
"""

OPEN_CALLS = r"""
CREATE OR REPLACE FUNCTION gateway_open_calls(items jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- Every item's inserts first, then every period row of the batch locked in id
-- order, then every item's holds: the locks are held for the holds and the commit.
DECLARE
  opened jsonb[] := '{}';
  one jsonb;
  all_ids bigint[];
  results jsonb := '[]'::jsonb;
  n int := 0;
  item jsonb;
BEGIN
  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, i) ORDER BY e.i
  LOOP
    opened := array_append(opened, gateway_open_insert(item));
  END LOOP;
  SELECT array_agg(DISTINCT x::bigint) INTO all_ids
    FROM unnest(opened) AS o(v), jsonb_array_elements_text(coalesce(o.v->'period_ids', '[]'::jsonb)) AS x;
  IF all_ids IS NOT NULL THEN
    PERFORM 1 FROM budgets_budgetperiod WHERE id = ANY(all_ids) ORDER BY id FOR UPDATE;
  END IF;
  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, i) ORDER BY e.i
  LOOP
    n := n + 1;
    one := opened[n];
    IF one ? 'exceeded' THEN
      results := results || jsonb_build_array(one);
    ELSE
      results := results || jsonb_build_array(jsonb_build_object(
        'call_id', one->'call_id', 'conversation_id', one->'conversation_id',
        'periods', gateway_open_reserve(item, (one->>'call_id')::bigint,
                                        ARRAY(SELECT jsonb_array_elements_text(one->'period_ids')::bigint))));
    END IF;
  END LOOP;
  RETURN results;
END
$fn$;
"""

FINISH_RECORD = r"""
CREATE OR REPLACE FUNCTION gateway_finish_record(p jsonb) RETURNS boolean
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- The call's outcome, its answer and the conversation's totals: everything of
-- finishing that needs no budget lock. False if the call was already closed
-- (by the reaper): then nothing is written here.
DECLARE
  now_ts timestamptz := (p->>'now')::timestamptz;
  cid bigint := (p->>'call_id')::bigint;
  cost numeric := (p->>'cost_usd')::numeric;
  total bigint := (p->>'total_tokens')::bigint;
  updated int;
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
  RETURN updated = 1;
END
$fn$;
"""

FINISH_SETTLE = r"""
CREATE OR REPLACE FUNCTION gateway_finish_settle(p jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- Charge what the provider reported (even on a call the reaper already
-- closed: the work was done), or release the holds of a call that cost
-- nothing. Locks the call's period rows in id order (a batch already has).
DECLARE
  now_ts timestamptz := (p->>'now')::timestamptz;
  cid bigint := (p->>'call_id')::bigint;
  cost numeric := (p->>'cost_usd')::numeric;
  total bigint := (p->>'total_tokens')::bigint;
  settling boolean := (p->>'cost_usd') IS NOT NULL;
  states text[];
  r record;
  period_ids bigint[];
  periods jsonb;
BEGIN
  IF NOT coalesce((p->>'has_holds')::boolean, false) THEN
    RETURN '[]'::jsonb;
  END IF;
  states := CASE WHEN settling THEN ARRAY['held', 'expired'] ELSE ARRAY['held'] END;
  SELECT array_agg(DISTINCT budget_period_id) INTO period_ids
    FROM budgets_reservation WHERE call_id = cid AND status = ANY(states);
  IF period_ids IS NULL THEN
    RETURN '[]'::jsonb;
  END IF;
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
  RETURN coalesce(periods, '[]'::jsonb);
END
$fn$;
"""

FINISH_CALL = r"""
CREATE OR REPLACE FUNCTION gateway_finish_call(p jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
DECLARE
  recorded boolean;
BEGIN
  recorded := gateway_finish_record(p);
  RETURN jsonb_build_object('recorded', recorded, 'settled', (p->>'cost_usd') IS NOT NULL,
                            'periods', gateway_finish_settle(p));
END
$fn$;
"""

FINISH_CALLS = r"""
CREATE OR REPLACE FUNCTION gateway_finish_calls(items jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- Every item's record first, then every period row of the batch locked in id
-- order, then every item's settlement.
DECLARE
  recorded boolean[] := '{}';
  period_ids bigint[];
  item jsonb;
  n int := 0;
  results jsonb := '[]'::jsonb;
BEGIN
  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, i) ORDER BY e.i
  LOOP
    recorded := array_append(recorded, gateway_finish_record(item));
  END LOOP;
  SELECT array_agg(DISTINCT r.budget_period_id) INTO period_ids
    FROM budgets_reservation r
   WHERE r.call_id IN (SELECT (i.value->>'call_id')::bigint FROM jsonb_array_elements(items) AS i(value)
                        WHERE (i.value->>'has_holds')::boolean)
     AND r.status IN ('held', 'expired');
  IF period_ids IS NOT NULL THEN
    PERFORM 1 FROM budgets_budgetperiod WHERE id = ANY(period_ids) ORDER BY id FOR UPDATE;
  END IF;
  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, i) ORDER BY e.i
  LOOP
    n := n + 1;
    results := results || jsonb_build_array(jsonb_build_object(
      'recorded', recorded[n], 'settled', (item->>'cost_usd') IS NOT NULL,
      'periods', gateway_finish_settle(item)));
  END LOOP;
  RETURN results;
END
$fn$;
"""

NEW_HELPERS = ("gateway_budget_excess(bigint[], numeric, bigint)", "gateway_open_insert(jsonb)",
               "gateway_open_reserve(jsonb, bigint, bigint[])", "gateway_finish_record(jsonb)",
               "gateway_finish_settle(jsonb)")


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for sql in (BUDGET_EXCESS, OPEN_INSERT, OPEN_RESERVE, OPEN_CALL, OPEN_CALLS,
                    FINISH_RECORD, FINISH_SETTLE, FINISH_CALL, FINISH_CALLS):
            schema_editor.execute(sql)


def restore(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        before = importlib.import_module("conversations.migrations.0004_gateway_sql_functions")
        for sql in (before.OPEN_CALL, before.FINISH_CALL, before.OPEN_CALLS, before.FINISH_CALLS):
            schema_editor.execute(sql)
        schema_editor.execute(";".join(f"DROP FUNCTION IF EXISTS {fn}" for fn in NEW_HELPERS))


class Migration(migrations.Migration):
    dependencies = [("conversations", "0005_drop_redundant_fk_indexes")]

    operations = [migrations.RunPython(create, restore)]
