"""Bring the role groups up to date with governance/roles.py now that the
budget, degradation, step-policy, cost-alert and fallback models exist:
managers may edit them, auditors see them and their history, on-call sees
cost events. Idempotent; reversing leaves the groups as they are."""

from django.db import migrations


def sync(apps, schema_editor):
    from governance.roles import sync_roles

    # create_all_permissions() runs first inside sync_roles: post_migrate has not
    # created the new models' permissions yet when this migration runs.
    sync_roles(apps=apps, using=schema_editor.connection.alias, strict=False)


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0004_apikey_requests_per_minute_apikey_tokens_per_minute_and_more"),
        ("budgets", "0002_budget_budgetperiod_costregressionrule_costevent_and_more"),
        ("conversations", "0002_providercall_attempts"),
        ("governance", "0002_roles"),
    ]

    operations = [migrations.RunPython(sync, migrations.RunPython.noop)]
