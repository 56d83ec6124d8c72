"""Batch forms of the gateway functions: several requests' opens (or finishes)
in one transaction, one round trip and one WAL flush (group commit; see
conversations/recording_sql.py for who batches and when).

Each item is still processed by the single-call function, in order, so a batch
writes exactly what the same calls one after another would. Deadlocks between
concurrent batches are ruled out the usual way: every budget period row the
batch will touch is locked first, in id order, and the caller orders the items
by conversation.
"""

from django.db import migrations

OPEN_CALLS = r"""
CREATE OR REPLACE FUNCTION gateway_open_calls(items jsonb) RETURNS jsonb
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
  b record;
  pid bigint;
  period_ids bigint[] := '{}';
  item jsonb;
  results jsonb := '[]'::jsonb;
BEGIN
  FOR b IN
    SELECT x.* FROM jsonb_array_elements(items) AS i(value),
           jsonb_to_recordset(coalesce(i.value->'budgets', '[]'::jsonb))
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
      IF pid IS NULL THEN
        SELECT id INTO pid FROM budgets_budgetperiod
         WHERE budget_id = b.budget_id AND subject = b.subject AND period_start = b.period_start;
      END IF;
    END IF;
    IF NOT pid = ANY(period_ids) THEN
      period_ids := period_ids || pid;
    END IF;
  END LOOP;
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
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

DROP = "DROP FUNCTION IF EXISTS gateway_open_calls(jsonb); DROP FUNCTION IF EXISTS gateway_finish_calls(jsonb);"


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(OPEN_CALLS)
        schema_editor.execute(FINISH_CALLS)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("conversations", "0005_gateway_functions_generic_plans")]

    operations = [migrations.RunPython(create, drop)]
