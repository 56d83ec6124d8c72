"""Provider keys get a fingerprint that history records (the keys themselves it never does)."""

import hashlib

from django.db import migrations, models


def fill(apps, schema_editor):
    """Fingerprints of the keys stored before the field existed. The
    historical rows keep '' (what was stored then is not recorded)."""
    def key_fingerprint(secret: str) -> str:  # governance.models.key_fingerprint, as of this migration
        return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12] if secret else ""

    for name in ("Application", "FallbackRoute"):
        model = apps.get_model("governance", name)
        for row in model.objects.exclude(provider_api_key="").only("pk", "provider_api_key"):
            model.objects.filter(pk=row.pk).update(provider_key_fingerprint=key_fingerprint(row.provider_api_key))


class Migration(migrations.Migration):

    dependencies = [
        ('governance', '0005_sync_roles_budgets'),
    ]

    operations = [
        migrations.AddField(
            model_name='application',
            name='provider_key_fingerprint',
            field=models.CharField(blank=True, help_text='Which provider key is stored, never the key itself.', max_length=24),
        ),
        migrations.AddField(
            model_name='fallbackroute',
            name='provider_key_fingerprint',
            field=models.CharField(blank=True, help_text='Which provider key is stored, never the key itself.', max_length=24),
        ),
        migrations.AddField(
            model_name='historicalapplication',
            name='provider_key_fingerprint',
            field=models.CharField(blank=True, help_text='Which provider key is stored, never the key itself.', max_length=24),
        ),
        migrations.AddField(
            model_name='historicalfallbackroute',
            name='provider_key_fingerprint',
            field=models.CharField(blank=True, help_text='Which provider key is stored, never the key itself.', max_length=24),
        ),
        migrations.RunPython(fill, migrations.RunPython.noop),
    ]
