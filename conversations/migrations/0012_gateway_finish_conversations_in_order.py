"""A finish batch takes its conversations' rows in the batch's order.

gateway_finish_records (migration 0011) updated the conversations' totals in
one UPDATE ... FROM an aggregate, which locks the rows in whatever order the
plan yields them (a hash aggregate's). Group commit sorts every batch by
conversation key, and the per-item form locked the rows in that order, so two
workers' batches that share conversations could never wait on each other in a
cycle. With the plan's order they could: a deadlock, which Postgres breaks
after a second by failing one batch (then written again item by item). The
rows are now locked first, in the batch's order, and then updated.

Snapshotted here (not read from a file) so this migration never changes.
"""

import importlib

from django.db import migrations

FINISH_RECORDS = r"""
CREATE OR REPLACE FUNCTION gateway_finish_records(items jsonb) RETURNS boolean[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
-- gateway_finish_record for every item of a batch: element n is true if item
-- n's call was still in progress and is now recorded. A call named twice is
-- recorded by its first item only, as one after another would be. A
-- conversation with several calls in the batch gets their totals at once; the
-- conversations are locked in the batch's order (group commit sorts batches by
-- conversation), as the items one by one would lock them.
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
    )
    SELECT done.ord FROM done
  LOOP
    recorded[r.ord] := true;
  END LOOP;

  PERFORM 1
     FROM conversations_conversation cv
     JOIN (SELECT (i.p->>'conversation_id')::bigint AS conv_id, min(i.ord) AS first
             FROM jsonb_array_elements(items) WITH ORDINALITY AS i(p, ord)
            WHERE recorded[i.ord] GROUP BY 1) t ON cv.id = t.conv_id
    ORDER BY t.first
      FOR NO KEY UPDATE OF cv;
  UPDATE conversations_conversation cv SET
    last_activity_at = t.last_at,
    call_count = cv.call_count + t.calls,
    total_tokens = cv.total_tokens + t.tokens,
    total_cost_usd = cv.total_cost_usd + t.cost
    FROM (SELECT (i.p->>'conversation_id')::bigint AS conv_id,
                 (array_agg((i.p->>'now')::timestamptz ORDER BY i.ord DESC))[1] AS last_at,
                 count(*) AS calls,
                 sum(coalesce((i.p->>'total_tokens')::bigint, 0)) AS tokens,
                 sum(coalesce((i.p->>'cost_usd')::numeric, 0)) AS cost
            FROM jsonb_array_elements(items) WITH ORDINALITY AS i(p, ord)
           WHERE recorded[i.ord] GROUP BY 1) t
   WHERE cv.id = t.conv_id;
  RETURN recorded;
END
$fn$;
"""


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FINISH_RECORDS)


def restore(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        before = importlib.import_module("conversations.migrations.0011_gateway_batch_set_based")
        schema_editor.execute(before.FINISH_RECORDS)


class Migration(migrations.Migration):
    dependencies = [("conversations", "0011_gateway_batch_set_based")]

    operations = [migrations.RunPython(create, restore)]
