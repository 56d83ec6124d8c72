"""Generic plans for the gateway functions' statements.

PL/pgSQL re-planned most of their statements on every call (custom plans win
the plan cache's cost comparison for parameterised single-row statements), and
planning was about an eighth of the database's CPU per request under load. The
statements are all keyed lookups and inserts whose best plan does not depend
on the values, so a generic plan is always right for them.
"""

from django.db import migrations

FUNCTIONS = ("gateway_open_call(jsonb)", "gateway_finish_call(jsonb)")


def generic(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for fn in FUNCTIONS:
            schema_editor.execute(f"ALTER FUNCTION {fn} SET plan_cache_mode = force_generic_plan")


def reset(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for fn in FUNCTIONS:
            schema_editor.execute(f"ALTER FUNCTION {fn} RESET plan_cache_mode")


class Migration(migrations.Migration):
    dependencies = [("conversations", "0004_gateway_sql_functions")]

    operations = [migrations.RunPython(generic, reset)]
