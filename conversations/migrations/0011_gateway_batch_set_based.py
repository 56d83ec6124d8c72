"""A batch's opens and finishes write each table once, not item by item.

gateway_open_calls and gateway_finish_calls called gateway_open_insert and
gateway_finish_record once per item: some eight statements per open (the
period lookups, the unlocked cap check, the conversation, the call, its
messages) and three per finish, each paying PL/pgSQL's per-statement cost.
gateway_open_inserts and gateway_finish_records do the same work with one
statement per table for the whole batch and answer item by item as before;
the locked part of both batch functions is unchanged. The one-request
functions keep their per-call forms: they are the reference the tests compare
a batch with.

Snapshotted here (not read from a file) so this migration never changes.
"""

import importlib

from django.db import migrations

OPEN_INSERTS = r"""
CREATE OR REPLACE FUNCTION gateway_open_inserts(items jsonb) RETURNS jsonb[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- gateway_open_insert for every item of a batch, one statement per table
-- instead of eight per item: element n is item n's answer, the same object
-- ({exceeded} or {call_id, conversation_id, period_ids}), with the same rows
-- written as if the items were opened one after another. The cap check here
-- reads the rows unlocked; gateway_open_calls checks again under the lock.
DECLARE
  out jsonb[] := array_fill(NULL::jsonb, ARRAY[jsonb_array_length(items)]);
  period_ids jsonb[] := array_fill('[]'::jsonb, ARRAY[jsonb_array_length(items)]);
  r record;
BEGIN
  -- Period rows not there yet, created in the order one-by-one opens would
  -- create them; concurrent first requests converge on one row.
  INSERT INTO budgets_budgetperiod
    (budget_id, subject, period_start, period_end, spent_usd, reserved_usd, spent_tokens, reserved_tokens, warned_at_percent)
  SELECT w.budget_id, w.subject, w.period_start, w.period_end, 0, 0, 0, 0, 0
    FROM (SELECT DISTINCT ON (b.budget_id, b.subject, b.period_start) b.budget_id, b.subject, b.period_start, b.period_end, b.first
            FROM (SELECT (e.v->>'budget_id')::bigint AS budget_id, e.v->>'subject' AS subject,
                         (e.v->>'period_start')::timestamptz AS period_start, (e.v->>'period_end')::timestamptz AS period_end,
                         i.ord * 100000 + e.k AS first
                    FROM jsonb_array_elements(items) WITH ORDINALITY AS i(p, ord),
                         jsonb_array_elements(coalesce(i.p->'budgets', '[]'::jsonb)) WITH ORDINALITY AS e(v, k)) b
           WHERE NOT EXISTS (SELECT 1 FROM budgets_budgetperiod bp
                              WHERE bp.budget_id = b.budget_id AND bp.subject = b.subject AND bp.period_start = b.period_start)
           ORDER BY b.budget_id, b.subject, b.period_start, b.first) w
   ORDER BY w.first
  ON CONFLICT (budget_id, subject, period_start) DO NOTHING;

  -- Each item's period rows (each once) and the first hard cap, in id order,
  -- that its hold would exceed, as gateway_budget_excess answers.
  FOR r IN
    WITH it AS (
      SELECT i.ord::int AS ord, i.p FROM jsonb_array_elements(items) WITH ORDINALITY AS i(p, ord)
    ), mine AS (
      SELECT DISTINCT it.ord, bp.id
        FROM it, jsonb_array_elements(coalesce(it.p->'budgets', '[]'::jsonb)) AS e(v)
        JOIN budgets_budgetperiod bp
          ON bp.budget_id = (e.v->>'budget_id')::bigint AND bp.subject = e.v->>'subject'
         AND bp.period_start = (e.v->>'period_start')::timestamptz
    ), over AS (
      SELECT DISTINCT ON (mine.ord) mine.ord, jsonb_build_object(
               'budget_id', bp.budget_id, 'period_id', bp.id,
               'unit', CASE WHEN bu.limit_usd IS NOT NULL
                             AND bp.spent_usd + bp.reserved_usd + coalesce((it.p->>'hold_usd')::numeric, 0) > bu.limit_usd
                            THEN 'usd' ELSE 'tokens' END,
               'spent_usd', bp.spent_usd::text, 'reserved_usd', bp.reserved_usd::text,
               'spent_tokens', bp.spent_tokens, 'reserved_tokens', bp.reserved_tokens) AS exceeded
        FROM mine JOIN it ON it.ord = mine.ord
        JOIN budgets_budgetperiod bp ON bp.id = mine.id JOIN budgets_budget bu ON bu.id = bp.budget_id
       WHERE bu.hard_cap
         AND ((bu.limit_usd IS NOT NULL
               AND bp.spent_usd + bp.reserved_usd + coalesce((it.p->>'hold_usd')::numeric, 0) > bu.limit_usd)
           OR (bu.limit_tokens IS NOT NULL
               AND bp.spent_tokens + bp.reserved_tokens + coalesce((it.p->>'hold_tokens')::bigint, 0) > bu.limit_tokens))
       ORDER BY mine.ord, bp.id
    )
    SELECT it.ord, over.exceeded,
           (SELECT coalesce(jsonb_agg(mine.id ORDER BY mine.id), '[]'::jsonb) FROM mine WHERE mine.ord = it.ord) AS ids
      FROM it LEFT JOIN over ON over.ord = it.ord
  LOOP
    IF r.exceeded IS NOT NULL THEN
      out[r.ord] := jsonb_build_object('exceeded', r.exceeded);
    ELSE
      period_ids[r.ord] := r.ids;
    END IF;
  END LOOP;

  -- New conversations of the items not refused: an existing one is only read
  -- (its last activity moves when the call finishes).
  INSERT INTO conversations_conversation
    (application_id, external_id, end_user, title, started_at, last_activity_at, call_count, total_tokens, total_cost_usd)
  SELECT w.app, w.ext, w.end_user, w.title, w.now_ts, w.now_ts, 0, 0, 0
    FROM (SELECT DISTINCT ON ((i.p->>'application_id')::bigint, i.p->>'external_id')
                 i.ord, (i.p->>'application_id')::bigint AS app, i.p->>'external_id' AS ext,
                 i.p->>'end_user' AS end_user, i.p->>'title' AS title, (i.p->>'now')::timestamptz AS now_ts
            FROM jsonb_array_elements(items) WITH ORDINALITY AS i(p, ord)
           WHERE out[i.ord] IS NULL
           ORDER BY (i.p->>'application_id')::bigint, i.p->>'external_id', i.ord) w
   WHERE NOT EXISTS (SELECT 1 FROM conversations_conversation c WHERE c.application_id = w.app AND c.external_id = w.ext)
   ORDER BY w.ord
  ON CONFLICT (application_id, external_id) DO UPDATE SET last_activity_at = EXCLUDED.last_activity_at;

  -- The calls, their ids drawn in item order, and their request messages.
  FOR r IN
    WITH src AS MATERIALIZED (
      SELECT s.ord, nextval(pg_get_serial_sequence('conversations_providercall', 'id')) AS id, s.p, s.conv_id
        FROM (SELECT i.ord::int AS ord, i.p, c.id AS conv_id
                FROM jsonb_array_elements(items) WITH ORDINALITY AS i(p, ord)
                JOIN conversations_conversation c
                  ON c.application_id = (i.p->>'application_id')::bigint AND c.external_id = i.p->>'external_id'
               WHERE out[i.ord] IS NULL) s
       ORDER BY s.ord
    ), calls AS (
      INSERT INTO conversations_providercall
        (id, request_id, application_id, api_key_id, key_prefix, conversation_id, end_user, step, endpoint, stream,
         model_requested, model_used, parameters, status, outcome, error_type, error_code, error_message,
         decisions, attempts, estimated_prompt_tokens, token_count_is_estimate, usage_source, price_id,
         provider_base_url, provider_response_id, finish_reason, created_at)
      SELECT src.id, p->>'request_id', (p->>'application_id')::bigint, (p->>'api_key_id')::bigint, p->>'key_prefix', src.conv_id,
             p->>'end_user', p->>'step', 'chat.completions', (p->>'stream')::boolean,
             p->>'model_requested', p->>'model_used', p->'parameters', 'in_progress', '', '', '', '',
             p->'decisions', '[]'::jsonb, (p->>'estimated_prompt_tokens')::int, (p->>'token_count_is_estimate')::boolean,
             'none', (p->>'price_id')::bigint, p->>'provider_base_url', '', '', (p->>'now')::timestamptz
        FROM src ORDER BY src.ord
    ), messages AS (
      INSERT INTO conversations_message
        (conversation_id, call_id, direction, position, role, name, content, parts, content_sha256, created_at)
      SELECT src.conv_id, src.id, 'request', m.position, m.role, m.name, m.content, m.parts, m.sha, (src.p->>'now')::timestamptz
        FROM src, jsonb_to_recordset(src.p->'messages') AS m(position int, role text, name text, content text, parts jsonb, sha text)
       ORDER BY src.ord, m.position
    )
    SELECT src.ord, src.id, src.conv_id FROM src
  LOOP
    out[r.ord] := jsonb_build_object('call_id', r.id, 'conversation_id', r.conv_id, 'period_ids', period_ids[r.ord]);
  END LOOP;
  RETURN out;
END
$fn$;
"""

FINISH_RECORDS = r"""
CREATE OR REPLACE FUNCTION gateway_finish_records(items jsonb) RETURNS boolean[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- gateway_finish_record for every item of a batch in one statement: element n
-- is true if item n's call was still in progress and is now recorded. A call
-- named twice is recorded by its first item only, as one after another would
-- be. A conversation with several calls in the batch gets their totals at once.
DECLARE
  recorded boolean[] := array_fill(false, ARRAY[jsonb_array_length(items)]);
  r record;
BEGIN
  FOR r IN
    WITH it AS (
      SELECT DISTINCT ON ((i.p->>'call_id')::bigint) i.ord::int AS ord, i.p, (i.p->>'call_id')::bigint AS cid
        FROM jsonb_array_elements(items) WITH ORDINALITY AS i(p, ord)
       ORDER BY (i.p->>'call_id')::bigint, i.ord
    ), done AS (
      UPDATE conversations_providercall c SET
        model_used = coalesce(it.p->>'model_used', c.model_used),
        price_id = coalesce((it.p->>'price_id')::bigint, c.price_id),
        attempts = it.p->'attempts',
        status = it.p->>'status',
        outcome = it.p->>'outcome',
        http_status = (it.p->>'http_status')::int,
        error_type = it.p->>'error_type',
        error_code = it.p->>'error_code',
        error_message = it.p->>'error_message',
        prompt_tokens = (it.p->>'prompt_tokens')::int,
        completion_tokens = (it.p->>'completion_tokens')::int,
        cached_tokens = (it.p->>'cached_tokens')::int,
        reasoning_tokens = (it.p->>'reasoning_tokens')::int,
        total_tokens = (it.p->>'total_tokens')::bigint,
        usage_source = it.p->>'usage_source',
        cost_usd = (it.p->>'cost_usd')::numeric,
        finish_reason = it.p->>'finish_reason',
        provider_response_id = it.p->>'provider_response_id',
        decisions = it.p->'decisions',
        latency_ms = (it.p->>'latency_ms')::int,
        provider_latency_ms = (it.p->>'provider_latency_ms')::int,
        completed_at = (it.p->>'now')::timestamptz
        FROM it
       WHERE c.id = it.cid AND (c.status = 'in_progress') IS TRUE
      RETURNING it.ord, it.p, it.cid
    ), answers AS (
      INSERT INTO conversations_message
        (conversation_id, call_id, direction, position, role, name, content, parts, content_sha256, created_at)
      SELECT (d.p->>'conversation_id')::bigint, d.cid, 'response', 0, 'assistant', '',
             d.p->'answer'->>'content', d.p->'answer'->'parts', d.p->'answer'->>'sha', (d.p->>'now')::timestamptz
        FROM done d WHERE d.p ? 'answer' ORDER BY d.ord
    ), totals AS (
      UPDATE conversations_conversation cv SET
        last_activity_at = t.last_at,
        call_count = cv.call_count + t.calls,
        total_tokens = cv.total_tokens + t.tokens,
        total_cost_usd = cv.total_cost_usd + t.cost
        FROM (SELECT (d.p->>'conversation_id')::bigint AS conv_id,
                     (array_agg((d.p->>'now')::timestamptz ORDER BY d.ord DESC))[1] AS last_at,
                     count(*) AS calls,
                     sum(coalesce((d.p->>'total_tokens')::bigint, 0)) AS tokens,
                     sum(coalesce((d.p->>'cost_usd')::numeric, 0)) AS cost
                FROM done d GROUP BY 1) t
       WHERE cv.id = t.conv_id
    )
    SELECT done.ord FROM done
  LOOP
    recorded[r.ord] := true;
  END LOOP;
  RETURN recorded;
END
$fn$;
"""

OPEN_CALLS = r"""
CREATE OR REPLACE FUNCTION gateway_open_calls(items jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
DECLARE
  opened jsonb[] := '{}';
  item jsonb;
  one jsonb;
  n int := 0;
  results jsonb := '[]'::jsonb;
  all_ids bigint[];
  per record;
  -- the batch's period rows, as locked and read, plus the holds so far
  ids bigint[] := '{}';
  a_budget_ids bigint[] := '{}';
  a_spent_usd numeric[] := '{}';
  a_reserved_usd numeric[] := '{}';
  a_spent_tokens bigint[] := '{}';
  a_reserved_tokens bigint[] := '{}';
  a_warned int[] := '{}';
  a_hard boolean[] := '{}';
  a_limit_usd numeric[] := '{}';
  a_limit_tokens bigint[] := '{}';
  mine bigint[];
  pid bigint;
  k int;
  hold_usd numeric;
  hold_tokens bigint;
  periods jsonb;
  -- the reservations to insert
  r_call bigint[] := '{}';
  r_period bigint[] := '{}';
  r_usd numeric[] := '{}';
  r_tokens bigint[] := '{}';
  r_created timestamptz[] := '{}';
  r_expires timestamptz[] := '{}';
BEGIN
  opened := gateway_open_inserts(items);

  SELECT array_agg(DISTINCT x::bigint) INTO all_ids
    FROM unnest(opened) AS o(v), jsonb_array_elements_text(coalesce(o.v->'period_ids', '[]'::jsonb)) AS x;
  IF all_ids IS NOT NULL THEN
    FOR per IN
      SELECT bp.id, bp.budget_id, bp.spent_usd, bp.reserved_usd, bp.spent_tokens, bp.reserved_tokens,
             bp.warned_at_percent, bu.hard_cap, bu.limit_usd, bu.limit_tokens
        FROM budgets_budgetperiod bp JOIN budgets_budget bu ON bu.id = bp.budget_id
       WHERE bp.id = ANY(all_ids) ORDER BY bp.id
         FOR UPDATE OF bp
    LOOP
      ids := ids || per.id;
      a_budget_ids := a_budget_ids || per.budget_id;
      a_spent_usd := a_spent_usd || per.spent_usd;
      a_reserved_usd := a_reserved_usd || per.reserved_usd;
      a_spent_tokens := a_spent_tokens || per.spent_tokens;
      a_reserved_tokens := a_reserved_tokens || per.reserved_tokens;
      a_warned := a_warned || per.warned_at_percent::int;
      a_hard := a_hard || per.hard_cap;
      a_limit_usd := a_limit_usd || per.limit_usd;
      a_limit_tokens := a_limit_tokens || per.limit_tokens;
    END LOOP;
  END IF;

  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, i) ORDER BY e.i
  LOOP
    n := n + 1;
    one := opened[n];
    IF one ? 'exceeded' THEN
      results := results || jsonb_build_array(one);
      CONTINUE;
    END IF;
    mine := ARRAY(SELECT DISTINCT x::bigint FROM jsonb_array_elements_text(coalesce(one->'period_ids', '[]'::jsonb)) AS x ORDER BY 1);
    hold_usd := coalesce((item->>'hold_usd')::numeric, 0)::numeric(24, 12);
    hold_tokens := coalesce((item->>'hold_tokens')::bigint, 0);
    -- The first hard cap in id order that this hold would exceed, as gateway_budget_excess checks.
    FOREACH pid IN ARRAY mine
    LOOP
      k := array_position(ids, pid);
      IF a_hard[k] AND ((a_limit_usd[k] IS NOT NULL AND a_spent_usd[k] + a_reserved_usd[k] + hold_usd > a_limit_usd[k])
                      OR (a_limit_tokens[k] IS NOT NULL AND a_spent_tokens[k] + a_reserved_tokens[k] + hold_tokens > a_limit_tokens[k])) THEN
        RAISE EXCEPTION 'a budget filled up while the call was being opened; open it again with lock_first'
          USING ERRCODE = 'GW001';
      END IF;
    END LOOP;
    periods := '[]'::jsonb;
    FOREACH pid IN ARRAY mine
    LOOP
      k := array_position(ids, pid);
      a_reserved_usd[k] := a_reserved_usd[k] + hold_usd;
      a_reserved_tokens[k] := a_reserved_tokens[k] + hold_tokens;
      periods := periods || jsonb_build_array(jsonb_build_object(
        'id', pid, 'budget_id', a_budget_ids[k],
        'spent_usd', a_spent_usd[k]::text, 'reserved_usd', a_reserved_usd[k]::text,
        'spent_tokens', a_spent_tokens[k], 'reserved_tokens', a_reserved_tokens[k],
        'warned_at_percent', a_warned[k]));
      r_call := r_call || (one->>'call_id')::bigint;
      r_period := r_period || pid;
      r_usd := r_usd || hold_usd;
      r_tokens := r_tokens || hold_tokens;
      r_created := r_created || (item->>'now')::timestamptz;
      r_expires := r_expires || (item->>'expires_at')::timestamptz;
    END LOOP;
    results := results || jsonb_build_array(jsonb_build_object(
      'call_id', one->'call_id', 'conversation_id', one->'conversation_id',
      'periods', CASE WHEN cardinality(mine) = 0 THEN NULL ELSE periods END));
  END LOOP;

  IF cardinality(r_call) > 0 THEN
    UPDATE budgets_budgetperiod bp
       SET reserved_usd = f.reserved_usd, reserved_tokens = f.reserved_tokens
      FROM unnest(ids, a_reserved_usd, a_reserved_tokens) AS f(id, reserved_usd, reserved_tokens)
     WHERE bp.id = f.id AND f.id = ANY(r_period);
    INSERT INTO budgets_reservation (call_id, budget_period_id, amount_usd, tokens, status, created_at, expires_at)
    SELECT c, p, u, t, 'held', cr, ex FROM unnest(r_call, r_period, r_usd, r_tokens, r_created, r_expires) AS r(c, p, u, t, cr, ex);
  END IF;
  RETURN results;
END
$fn$;
"""

FINISH_CALLS = r"""
CREATE OR REPLACE FUNCTION gateway_finish_calls(items jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
DECLARE
  recorded boolean[] := '{}';
  item jsonb;
  n int := 0;
  results jsonb := '[]'::jsonb;
  per record;
  ids bigint[] := '{}';
  a_budget_ids bigint[] := '{}';
  a_spent_usd numeric[] := '{}';
  a_reserved_usd numeric[] := '{}';
  a_spent_tokens bigint[] := '{}';
  a_reserved_tokens bigint[] := '{}';
  a_warned int[] := '{}';
  done record;
  k int;
  touched bigint[] := '{}';
  by_item jsonb[];
BEGIN
  recorded := gateway_finish_records(items);
  by_item := array_fill(NULL::jsonb, ARRAY[jsonb_array_length(items)]);

  FOR per IN
    SELECT bp.id, bp.budget_id, bp.spent_usd, bp.reserved_usd, bp.spent_tokens, bp.reserved_tokens, bp.warned_at_percent
      FROM budgets_budgetperiod bp
     WHERE bp.id IN (SELECT r.budget_period_id FROM budgets_reservation r
                      WHERE r.call_id IN (SELECT (i.value->>'call_id')::bigint FROM jsonb_array_elements(items) AS i(value)
                                           WHERE (i.value->>'has_holds')::boolean)
                        AND r.status IN ('held', 'expired'))
     ORDER BY bp.id
       FOR UPDATE OF bp
  LOOP
    ids := ids || per.id;
    a_budget_ids := a_budget_ids || per.budget_id;
    a_spent_usd := a_spent_usd || per.spent_usd;
    a_reserved_usd := a_reserved_usd || per.reserved_usd;
    a_spent_tokens := a_spent_tokens || per.spent_tokens;
    a_reserved_tokens := a_reserved_tokens || per.reserved_tokens;
    a_warned := a_warned || per.warned_at_percent::int;
  END LOOP;

  IF cardinality(ids) > 0 THEN
    -- Every open hold of the batch closed in one statement: charged with what
    -- the provider reported, or released when the call cost nothing. A hold
    -- the reaper closed meanwhile is skipped (its status no longer matches).
    FOR done IN
      WITH wanted AS (  -- a call named twice is settled by its first item, as one after another would be
        SELECT DISTINCT ON ((i.value->>'call_id')::bigint)
               i.ord, (i.value->>'call_id')::bigint AS call_id, (i.value->>'now')::timestamptz AS now_ts,
               (i.value->>'cost_usd') IS NOT NULL AS settling,
               (i.value->>'cost_usd')::numeric(24, 12) AS cost, (i.value->>'total_tokens')::bigint AS total
          FROM jsonb_array_elements(items) WITH ORDINALITY AS i(value, ord)
         WHERE coalesce((i.value->>'has_holds')::boolean, false)
         ORDER BY (i.value->>'call_id')::bigint, i.ord
      ), target AS (
        SELECT r.id, r.status AS was, r.budget_period_id, r.amount_usd, r.tokens, w.*
          FROM budgets_reservation r JOIN wanted w ON r.call_id = w.call_id
         WHERE r.status = 'held' OR (w.settling AND r.status = 'expired')
      ), closed AS (
        UPDATE budgets_reservation r SET
          status = CASE WHEN t.settling THEN 'settled' ELSE 'released' END,
          closed_at = t.now_ts,
          settled_usd = CASE WHEN t.settling THEN t.cost ELSE r.settled_usd END,
          settled_tokens = CASE WHEN t.settling THEN coalesce(t.total, 0) ELSE r.settled_tokens END
          FROM target t
         WHERE r.id = t.id AND r.status = t.was
        RETURNING t.ord, t.budget_period_id, t.was, t.amount_usd, t.tokens, t.settling, t.cost, t.total
      )
      SELECT * FROM closed ORDER BY ord, budget_period_id
    LOOP
      k := array_position(ids, done.budget_period_id);
      IF done.was = 'held' THEN
        a_reserved_usd[k] := a_reserved_usd[k] - done.amount_usd;
        a_reserved_tokens[k] := a_reserved_tokens[k] - done.tokens;
      END IF;
      a_spent_usd[k] := a_spent_usd[k] + coalesce(done.cost, 0);
      IF done.settling THEN
        a_spent_tokens[k] := a_spent_tokens[k] + coalesce(done.total, 0);
      END IF;
      touched := touched || done.budget_period_id;
      by_item[done.ord] := coalesce(by_item[done.ord], '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
        'id', ids[k], 'budget_id', a_budget_ids[k],
        'spent_usd', a_spent_usd[k]::text, 'reserved_usd', a_reserved_usd[k]::text,
        'spent_tokens', a_spent_tokens[k], 'reserved_tokens', a_reserved_tokens[k],
        'warned_at_percent', a_warned[k]));
    END LOOP;
    UPDATE budgets_budgetperiod bp
       SET spent_usd = f.spent_usd, reserved_usd = f.reserved_usd,
           spent_tokens = f.spent_tokens, reserved_tokens = f.reserved_tokens
      FROM unnest(ids, a_spent_usd, a_reserved_usd, a_spent_tokens, a_reserved_tokens)
             AS f(id, spent_usd, reserved_usd, spent_tokens, reserved_tokens)
     WHERE bp.id = f.id AND f.id = ANY(touched);
  END IF;

  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, i) ORDER BY e.i
  LOOP
    n := n + 1;
    results := results || jsonb_build_array(jsonb_build_object(
      'recorded', recorded[n], 'settled', (item->>'cost_usd') IS NOT NULL,
      'periods', coalesce(by_item[n], '[]'::jsonb)));
  END LOOP;
  RETURN results;
END
$fn$;
"""


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(OPEN_INSERTS)
        schema_editor.execute(FINISH_RECORDS)
        schema_editor.execute(OPEN_CALLS)
        schema_editor.execute(FINISH_CALLS)


def restore(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        before = importlib.import_module("conversations.migrations.0007_gateway_batch_budget_rows_once")
        schema_editor.execute(before.OPEN_CALLS)
        schema_editor.execute(before.FINISH_CALLS)
        schema_editor.execute("DROP FUNCTION IF EXISTS gateway_open_inserts(jsonb)")
        schema_editor.execute("DROP FUNCTION IF EXISTS gateway_finish_records(jsonb)")


class Migration(migrations.Migration):
    dependencies = [("conversations", "0010_conversation_fewer_indexes")]

    operations = [migrations.RunPython(create, restore)]
