"""Finishing a call finds it by its primary key.

gateway_finish_record updated `WHERE id = cid AND status = 'in_progress'`.
That predicate matches the partial index of calls in progress (the reaper's,
on created_at), which is small, so the planner scanned all of it and
filtered on the id instead of looking the id up: every finish walked every
call in flight and every entry left by calls finished since the last vacuum
(a finished call's entry stays until then). Written as `IS TRUE` the status
test no longer proves the index's condition, and the lookup is by id.
Same rows, same result.

Snapshotted here (not read from a file) so this migration never changes.
"""

import importlib

from django.db import migrations

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
  WHERE id = cid AND (status = 'in_progress') IS TRUE;
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


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FINISH_RECORD)


def restore(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        before = importlib.import_module("conversations.migrations.0006_gateway_lock_budgets_last")
        schema_editor.execute(before.FINISH_RECORD)


class Migration(migrations.Migration):
    dependencies = [("conversations", "0007_gateway_batch_budget_rows_once")]

    operations = [migrations.RunPython(create, restore)]
