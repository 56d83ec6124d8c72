"""A conversation keeps the indexes something reads: two fewer.

Every finish updates its conversation (totals, last activity), and since
last_activity_at is indexed the update is not HOT: it writes an entry in every
index of the table. The end user's varchar_pattern_ops twin (LIKE 'x%', which
nothing runs) and the started_at index (nothing sorts or filters on it) were
two of the six.
"""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('conversations', '0009_call_request_id_one_index'),
        ('governance', '0006_provider_key_fingerprint'),
    ]

    operations = [
        migrations.AlterField(
            model_name='conversation',
            name='end_user',
            field=models.CharField(blank=True, max_length=128),
        ),
        migrations.AlterField(
            model_name='conversation',
            name='started_at',
            field=models.DateTimeField(),
        ),
        migrations.AddIndex(
            model_name='conversation',
            index=models.Index(fields=['end_user'], name='conversation_end_user_idx'),
        ),
    ]
