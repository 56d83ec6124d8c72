"""A call's request id gets one plain index instead of two.

db_index=True on a CharField gave Postgres a second, varchar_pattern_ops
index for LIKE 'prefix%' that nothing runs, written on every call's insert
and again on its (non-HOT) finish. The admin's search by request id now
matches exactly (it was iexact, UPPER() = UPPER(), which no index answered).
"""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('budgets', '0004_drop_redundant_fk_indexes'),
        ('conversations', '0008_gateway_finish_by_primary_key'),
        ('governance', '0005_sync_roles_budgets'),
    ]

    operations = [
        migrations.AlterField(
            model_name='providercall',
            name='request_id',
            field=models.CharField(max_length=128),
        ),
        migrations.AddIndex(
            model_name='providercall',
            index=models.Index(fields=['request_id'], name='call_request_id_idx'),
        ),
    ]
