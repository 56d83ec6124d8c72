"""Create the role groups (Manager, Auditor, Reviewer, Support agent,
On-call) from governance/roles.py. Idempotent; reversing leaves the groups
(deleting them could strip people of access they were given by hand)."""

from django.db import migrations


def create_roles(apps, schema_editor):
    from governance.roles import sync_roles

    sync_roles(apps=apps, using=schema_editor.connection.alias, strict=False)


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0001_initial"),
        ("budgets", "0001_initial"),
        ("conversations", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("admin", "0003_logentry_add_action_flag_choices"),
    ]

    operations = [migrations.RunPython(create_roles, migrations.RunPython.noop)]
