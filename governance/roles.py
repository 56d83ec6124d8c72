"""Roles are Django groups whose permissions are defined here, in code.

`sync_roles()` makes the groups match these definitions exactly (it is
idempotent: permissions added by hand to a role group are removed, so the
definition here stays the single source of truth). The data migration
`governance/0002_roles` (and `0005_sync_roles_budgets`, for the budget and
resilience models) calls it with the migration's app registry; a
management command or a test can call it with none.

A permission spec is "app_label.codename", or "app_label.view_*" for every
view permission of an app (its historical models included), so a model added
to an app later is covered the next time roles are synced.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.apps import apps as global_apps
from django.db import DEFAULT_DB_ALIAS

GOVERNED_APPS = ("governance", "budgets", "conversations")

TRAFFIC_VIEW = (
    "conversations.view_conversation",
    "conversations.view_providercall",
    "conversations.view_message",
)


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    permissions: tuple[str, ...]


MANAGER = "Manager"
AUDITOR = "Auditor"
REVIEWER = "Reviewer"
SUPPORT_AGENT = "Support agent"
ON_CALL = "On-call"

ROLES: tuple[Role, ...] = (
    Role(
        MANAGER,
        "Runs the platform: model catalogue and prices, applications, keys, budgets, degradation "
        "ladders, step caps, cost alerts and fallbacks. Sees everything in the governed apps and its "
        "history (budget periods, reservations and cost events included).",
        (
            *(f"{app}.view_*" for app in GOVERNED_APPS),
            "budgets.add_languagemodel",
            "budgets.change_languagemodel",
            "budgets.add_modelprice",
            "budgets.change_modelprice",
            "governance.add_application",
            "governance.change_application",
            "governance.add_apikey",
            "governance.change_apikey",  # revoke, and set a key's rate limits; nothing else
            # Budgets, the degradation ladder, step caps, cost alerts, fallbacks.
            # Budgets and cost rules are deactivated, never deleted: their periods,
            # reservations and events point at them. Ladder rungs, step policies
            # and fallback routes can be removed (history keeps the deleted row).
            "budgets.add_budget",
            "budgets.change_budget",
            "budgets.add_degradationrule",
            "budgets.change_degradationrule",
            "budgets.delete_degradationrule",
            "budgets.add_steppolicy",
            "budgets.change_steppolicy",
            "budgets.delete_steppolicy",
            "budgets.add_costregressionrule",
            "budgets.change_costregressionrule",
            "governance.add_fallbackroute",
            "governance.change_fallbackroute",
            "governance.delete_fallbackroute",
        ),
    ),
    Role(
        AUDITOR,
        "Read-only on everything: traffic, configuration and its history, users and groups. "
        "Can change nothing.",
        (
            *(f"{app}.view_*" for app in GOVERNED_APPS),
            "auth.view_user",
            "auth.view_group",
            "auth.view_permission",
            "admin.view_logentry",
        ),
    ),
    Role(REVIEWER, "Works the review queue; reads conversations and calls.", TRAFFIC_VIEW),
    Role(SUPPORT_AGENT, "Looks up conversations a user reported.", TRAFFIC_VIEW),
    Role(
        ON_CALL,
        "Investigates incidents from the call log, cost events and the circuit breakers screen "
        "(which needs conversations.view_providercall).",
        ("conversations.view_providercall", "budgets.view_costevent"),
    ),
)


def role(name: str) -> Role:
    for r in ROLES:
        if r.name == name:
            return r
    raise KeyError(name)


def create_all_permissions(*, apps=global_apps, using: str = DEFAULT_DB_ALIAS) -> None:
    """Create content types and permissions now rather than at post_migrate,
    which has not run yet when a data migration executes."""
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        if apps is global_apps:
            create_permissions(app_config, verbosity=0, using=using, apps=apps)
            continue
        # A migration state's app configs have no models module; the flag
        # only tells create_permissions that the app has models.
        app_config.models_module = True
        try:
            create_permissions(app_config, verbosity=0, using=using, apps=apps)
        finally:
            app_config.models_module = None


def sync_roles(*, apps=global_apps, using: str = DEFAULT_DB_ALIAS, strict: bool = True) -> dict[str, int]:
    """Create or update the role groups to match ROLES exactly. Returns the
    number of permissions each role ended up with.

    With `strict` (the default), a spec naming a permission that does not
    exist raises LookupError: a typo must not silently grant less. The data
    migration passes strict=False, because it runs against the schema of its
    own point in history, where models added to ROLES later do not exist yet;
    run sync_roles() again after migrating to pick those up."""
    create_all_permissions(apps=apps, using=using)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")

    result: dict[str, int] = {}
    for r in ROLES:
        perms = []
        for spec in r.permissions:
            app_label, codename = spec.split(".", 1)
            if codename.endswith("*"):
                found = list(
                    Permission.objects.using(using).filter(
                        content_type__app_label=app_label, codename__startswith=codename[:-1]
                    )
                )
                if not found and strict:
                    raise LookupError(f"Role {r.name!r}: no permission matches {spec!r}")
            else:
                found = list(
                    Permission.objects.using(using).filter(content_type__app_label=app_label, codename=codename)
                )
                if len(found) != 1 and strict:
                    raise LookupError(f"Role {r.name!r}: no permission {spec!r}")
            perms.extend(found)
        group, _ = Group.objects.using(using).get_or_create(name=r.name)
        group.permissions.set(perms)
        result[r.name] = len({p.pk for p in perms})
    return result
