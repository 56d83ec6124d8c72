from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from governance.models import Application
from governance.services import create_api_key


class Command(BaseCommand):
    help = "Create an API key for an application and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("application", help="application slug, e.g. support-bot")
        parser.add_argument("--name", default="", help="what will use the key, e.g. 'web widget'")
        parser.add_argument("--actor", default="", help="username recorded in the key's history")

    def handle(self, *args, application, name, actor, **options):
        try:
            app = Application.objects.get(slug=application)
        except Application.DoesNotExist:
            known = ", ".join(Application.objects.values_list("slug", flat=True)) or "none yet"
            raise CommandError(f"No application with slug '{application}'. Known: {known}.") from None
        user = None
        if actor:
            user = get_user_model().objects.filter(username=actor).first()
            if user is None:
                raise CommandError(f"No user '{actor}'.")
        issued = create_api_key(application=app, name=name or "created from the command line", actor=user)
        self.stderr.write(f"Key {issued.api_key.prefix}… for '{app.slug}'. Copy it now: it is not shown again.")
        self.stdout.write(issued.secret)
