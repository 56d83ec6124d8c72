"""A batch writes each budget period row once, not once per hold.

Migration 0006's batch functions reserved and settled item by item: each item
locked its period rows again and updated them. Inside one transaction every
update of a row leaves a new row version that the next lookup of that row
walks past, so a batch of n requests against the same three period rows cost
in the order of n² row visits: at c=200 with 500 ms provider latency the
re-locks alone averaged 0.3-0.4 ms per request (pg_stat_statements), and the
batches that formed under a burst were the slowest to write, while every
other writer of the application waited for their locks.

Now a batch locks and reads its period rows once (in id order, after the
inserts, as before), checks each item's holds in order against those values
plus the holds of the items before it, and then writes each period row once
with the batch's total, all reservations in one INSERT (open) or one UPDATE
(finish). Every item still gets the period values as they stood after its
own hold or settlement, for the warning thresholds. Each amount is rounded to
the column's scale before it is added, exactly as a per-item update stored it.

An item whose hold no longer fits raises GW001 as before: the batch rolls
back and its requests are written one at a time (conversations/recording_sql.py).
Single-call functions are unchanged: a lone call updates each row once anyway.

Snapshotted here (not read from a file) so this migration never changes.
"""

import importlib

from django.db import migrations

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
  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, i) ORDER BY e.i
  LOOP
    opened := array_append(opened, gateway_open_insert(item));
  END LOOP;

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
  FOR item IN SELECT e.value FROM jsonb_array_elements(items) WITH ORDINALITY AS e(value, i) ORDER BY e.i
  LOOP
    recorded := array_append(recorded, gateway_finish_record(item));
  END LOOP;
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
      WITH wanted AS (
        SELECT i.ord, (i.value->>'call_id')::bigint AS call_id, (i.value->>'now')::timestamptz AS now_ts,
               (i.value->>'cost_usd') IS NOT NULL AS settling,
               (i.value->>'cost_usd')::numeric(24, 12) AS cost, (i.value->>'total_tokens')::bigint AS total
          FROM jsonb_array_elements(items) WITH ORDINALITY AS i(value, ord)
         WHERE coalesce((i.value->>'has_holds')::boolean, false)
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
        schema_editor.execute(OPEN_CALLS)
        schema_editor.execute(FINISH_CALLS)


def restore(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        before = importlib.import_module("conversations.migrations.0006_gateway_lock_budgets_last")
        schema_editor.execute(before.OPEN_CALLS)
        schema_editor.execute(before.FINISH_CALLS)


class Migration(migrations.Migration):
    dependencies = [("conversations", "0006_gateway_lock_budgets_last")]

    operations = [migrations.RunPython(create, restore)]
