"""The Django admin that managers and auditors use: traffic is read-only for
everyone, configuration keeps history with the acting user, keys show their
secret once, roles grant what they say."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from budgets.models import ModelPrice
from conversations.models import Conversation, Message
from conversations.selectors import conversation_timeline, search_conversations, split_requests
from governance.models import ApiKey, Application, key_fingerprint
from governance.roles import AUDITOR, MANAGER, ON_CALL, ROLES, SUPPORT_AGENT, sync_roles
from governance.services import create_api_key, hash_key
from tests.factories import (
    admin_url as url,
    Turn,
    make_application,
    make_conversation,
    make_model,
    make_rejected_call,
    make_user,
)

pytestmark = pytest.mark.django_db


# --- Fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def catalogue():
    model, price = make_model(name="gpt-4o-mini")
    make_model(name="gpt-4o", input_per_million="2.50", cached_input_per_million="1.25", output_per_million="10.00")
    return price


@pytest.fixture
def app(catalogue):
    return make_application(slug="support-bot")


@pytest.fixture
def other_app(catalogue):
    return make_application(slug="sales-bot")


@pytest.fixture
def conversation(app, catalogue):
    return make_conversation(
        application=app,
        price=catalogue,
        external_id="chat-password",
        end_user="alice@example.com",
        turns=[
            Turn("How do I reset my password?", "Open Settings, then Security, then 'Reset password'.", request_id="req_pw_1"),
            Turn("The reset link says it expired.", "Links last 15 minutes; request a new one.", request_id="req_pw_2",
                 decisions=[{"type": "pii_masking", "masked": ["email"]}]),
            Turn("Thanks, that worked!", "Glad it helped.", request_id="req_pw_3"),
        ],
    )


@pytest.fixture
def other_conversation(other_app, catalogue):
    _, big_price = make_model(name="gpt-4o", input_per_million="2500.00", cached_input_per_million=None,
                              output_per_million="5000.00", effective_from=timezone.now() - timedelta(days=60))
    return make_conversation(
        application=other_app,
        price=big_price,
        external_id="chat-invoice",
        end_user="bob@example.com",
        turns=[
            Turn("Where is my invoice for March?", None, request_id="req_inv_1"),
            Turn("Where is my invoice for March?", "Invoices are under Billing > History.", request_id="req_inv_2",
                 outcome="degraded"),
        ],
    )


@pytest.fixture
def rejected_call():
    return make_rejected_call(request_id="req_bad_key")


def timeline_html(html: str) -> str:
    """The timeline section without the collapsed "full request" blocks."""
    section = re.search(r'<section class="gov-timeline".*?</section>', html, re.S).group(0)
    return re.sub(r'<details class="gov-full-request">.*?</details>', "", section, flags=re.S)


# --- Timeline logic (selectors) ----------------------------------------------------------------


def k(role: str, text: str) -> tuple[str, str]:
    return (role, text)  # stands in for (role, content_sha256)


class TestSplitRequests:
    def test_chat_flow_shows_only_the_new_user_turn(self):
        s, u1, a1, u2, a2, u3 = k("system", "s"), k("user", "1"), k("assistant", "a1"), k("user", "2"), k("assistant", "a2"), k("user", "3")
        splits = split_requests(exchanges=[([s, u1], [a1]), ([s, u1, a1, u2], [a2]), ([s, u1, a1, u2, a2, u3], [])])
        assert [x.shown for x in splits] == [0, 3, 5]
        assert all(x.follows_previous for x in splits)

    def test_retry_after_failure_adds_nothing_new(self):
        s, u1 = k("system", "s"), k("user", "1")
        splits = split_requests(exchanges=[([s, u1], []), ([s, u1], [k("assistant", "a")])])
        assert [x.shown for x in splits] == [0, 2]
        assert splits[1].follows_previous

    def test_rewritten_history_is_flagged_and_shown_from_the_divergence(self):
        s, u1, a1, u2 = k("system", "s"), k("user", "1"), k("assistant", "a1"), k("user", "2")
        trimmed = [s, u2]  # the bot dropped the first exchange
        splits = split_requests(exchanges=[([s, u1], [a1]), (trimmed, [])])
        assert splits[1].shown == 1
        assert not splits[1].follows_previous

    def test_interleaved_steps_do_not_repeat_history(self):
        s, u1, a1 = k("system", "s"), k("user", "1"), k("assistant", "a1")
        c = k("system", "classify")
        exchanges = [
            ([c, u1], [k("assistant", "billing")]),
            ([s, u1], [a1]),
            ([c, u1, a1, k("user", "2")], [k("assistant", "billing")]),
            ([s, u1, a1, k("user", "2")], []),
        ]
        splits = split_requests(exchanges=exchanges)
        # Call 4 continues call 2's exchange even though call 3 came in between.
        assert [x.shown for x in splits] == [0, 0, 2, 3]
        # Without steps, alternating calls look like rewritten history; with them, they do not.
        assert [x.follows_previous for x in splits] == [True, False, False, False]
        with_steps = split_requests(exchanges=exchanges, steps=["classify", "answer", "classify", "answer"])
        assert [x.follows_previous for x in with_steps] == [True, True, True, True]

    def test_repeated_identical_messages_are_matched_by_position(self):
        s, yes, ok = k("system", "s"), k("user", "yes"), k("assistant", "ok")
        splits = split_requests(exchanges=[([s, yes], [ok]), ([s, yes, ok, yes], [ok])])
        assert splits[1].shown == 3


def test_conversation_timeline_new_messages_and_answers(conversation):
    timeline = conversation_timeline(conversation=conversation)
    assert [e.call.request_id for e in timeline] == ["req_pw_1", "req_pw_2", "req_pw_3"]
    assert [[(m.role, m.content) for m in e.new_messages] for e in timeline] == [
        [("system", "You are the support assistant of Example Ltd."), ("user", "How do I reset my password?")],
        [("user", "The reset link says it expired.")],
        [("user", "Thanks, that worked!")],
    ]
    assert [[m.content for m in e.answers] for e in timeline] == [
        ["Open Settings, then Security, then 'Reset password'."],
        ["Links last 15 minutes; request a new one."],
        ["Glad it helped."],
    ]
    assert [e.request_count for e in timeline] == [2, 4, 6]
    assert [e.repeated_count for e in timeline] == [0, 3, 5]
    assert all(e.follows_previous for e in timeline)


def test_conversation_timeline_after_a_failed_call(other_conversation):
    first, retry = conversation_timeline(conversation=other_conversation)
    assert first.answers == [] and first.call.status == "failed"
    assert retry.new_messages == []  # the retry re-sent exactly the same history
    assert [m.content for m in retry.answers] == ["Invoices are under Billing > History."]


def test_conversation_timeline_uses_two_queries(conversation, django_assert_num_queries):
    with django_assert_num_queries(2):
        conversation_timeline(conversation=conversation)


def test_search_prefers_exact_request_id(conversation, other_conversation):
    qs = Conversation.objects.all()
    assert list(search_conversations(queryset=qs, term="req_inv_2")) == [other_conversation]
    assert list(search_conversations(queryset=qs, term="  reset LINK ")) == [conversation]
    # A word in every message of both conversations: each conversation once.
    assert sorted(c.pk for c in search_conversations(queryset=qs, term="support assistant")) == sorted(
        [conversation.pk, other_conversation.pk]
    )
    assert list(search_conversations(queryset=qs, term="req_nope")) == []


# --- Pages render for superusers and auditors -------------------------------------------------


@pytest.fixture(params=["superuser", "auditor"])
def viewer(request, client):
    user = request.getfixturevalue(request.param)
    client.force_login(user)
    return user


def test_traffic_pages_render(client, viewer, conversation, other_conversation, rejected_call):
    call = conversation.calls.get(request_id="req_pw_2")
    pages = [
        url("index"),
        url("conversations_conversation_changelist"),
        url("conversations_conversation_change", conversation.pk),
        url("conversations_conversation_change", other_conversation.pk),
        url("conversations_providercall_changelist"),
        url("conversations_providercall_change", call.pk),
        url("conversations_providercall_change", rejected_call.pk),
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page

    listing = client.get(url("conversations_conversation_changelist")).content.decode()
    assert "How do I reset my password?" in listing and "chat-invoice" in listing
    assert "$0.000" in listing  # costs as USD with 6 decimals
    calls = client.get(url("conversations_providercall_changelist")).content.decode()
    assert "req_bad_key" in calls and "invalid_api_key" in calls and "req_pw_3" in calls

    detail = client.get(url("conversations_providercall_change", call.pk)).content.decode()
    assert "The reset link says it expired." in detail  # messages inline
    assert "pii_masking" in detail
    assert f'#call-{call.pk}' in detail  # link into the conversation's timeline
    assert 'name="_save"' not in detail


def test_configuration_pages_render(client, viewer, app, catalogue):
    key = create_api_key(application=app, name="widget").api_key
    pages = [
        url("governance_application_changelist"),
        url("governance_application_change", app.pk),
        url("governance_application_history", app.pk),
        url("governance_apikey_changelist"),
        url("governance_apikey_change", key.pk),
        url("governance_apikey_history", key.pk),
        url("budgets_languagemodel_changelist"),
        url("budgets_languagemodel_change", catalogue.model.pk),
        url("budgets_modelprice_changelist"),
        url("budgets_modelprice_change", catalogue.pk),
        url("budgets_modelprice_history", catalogue.pk),
        url("configuration_changes"),
    ]
    for page in pages:
        assert client.get(page).status_code == 200, page
    key_page = client.get(url("governance_apikey_change", key.pk)).content.decode()
    assert key.key_hash not in key_page
    assert key.prefix in key_page


def test_conversation_timeline_page(client, superuser, conversation):
    client.force_login(superuser)
    html = client.get(url("conversations_conversation_change", conversation.pk)).content.decode()
    visible = timeline_html(html)
    # Each user turn appears once in the timeline (not re-shown with every later call)...
    assert visible.count("How do I reset my password?") == 1
    assert visible.count("The reset link says it expired.") == 1
    assert visible.count("You are the support assistant of Example Ltd.") == 1
    # ...every answer is shown, marked as an answer...
    assert visible.count('data-direction="response"') == 3
    assert "Links last 15 minutes; request a new one." in visible
    # ...and the full request of each call is one click away.
    for n in (2, 4, 6):
        assert f"Show full request ({n} messages)" in html
    assert "req_pw_1" in visible and "gpt-4o-mini" in visible
    call = conversation.calls.get(request_id="req_pw_2")
    assert f"${call.cost_usd:,.6f}" in visible
    assert "ms" in visible and "pii_masking" in visible
    assert 'name="_save"' not in html and 'name="_continue"' not in html


def test_timeline_shows_failed_call_error(client, superuser, other_conversation):
    client.force_login(superuser)
    visible = timeline_html(client.get(url("conversations_conversation_change", other_conversation.pk)).content.decode())
    assert "provider_unavailable" in visible
    assert "No answer." in visible
    assert "No new messages: the same 2 messages as before were sent again." in visible
    assert "gov-badge gov-bad" in visible and "gov-badge gov-warn" in visible  # failed, degraded


# --- Filters and search ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, expected",
    [
        ({"application__id__exact": "APP"}, {"chat-password"}),
        ({"model_used": "gpt-4o"}, {"chat-invoice"}),
        ({"model_used": "gpt-4o-mini"}, {"chat-password"}),
        ({"outcome": "failed"}, {"chat-invoice"}),
        ({"outcome": "answered"}, {"chat-password"}),
        ({"end_user": "alice@example.com"}, {"chat-password"}),
        ({"cost": "lt_0.001"}, {"chat-password"}),
        ({"cost": "gte_0.10"}, {"chat-invoice"}),
        ({"cost": "0.01_0.10"}, set()),
        ({"q": "req_pw_3"}, {"chat-password"}),
        ({"q": "req_inv_1"}, {"chat-invoice"}),
        ({"q": "billing > history"}, {"chat-invoice"}),
        ({"q": "expired"}, {"chat-password"}),
        ({"q": "no such text anywhere"}, set()),
    ],
)
def test_conversation_filters_and_search(client, auditor, conversation, other_conversation, query, expected):
    client.force_login(auditor)
    query = {k: (str(conversation.application_id) if v == "APP" else v) for k, v in query.items()}
    response = client.get(url("conversations_conversation_changelist"), query)
    assert response.status_code == 200
    found = {c.external_id for c in response.context["cl"].result_list}
    assert found == expected


def test_conversation_date_hierarchy(client, auditor, conversation):
    client.force_login(auditor)
    today = conversation.last_activity_at
    response = client.get(
        url("conversations_conversation_changelist"),
        {"last_activity_at__year": today.year, "last_activity_at__month": today.month},
    )
    assert [c.external_id for c in response.context["cl"].result_list] == ["chat-password"]
    response = client.get(url("conversations_conversation_changelist"), {"last_activity_at__year": today.year - 3})
    assert list(response.context["cl"].result_list) == []


def test_call_filters_and_search(client, auditor, conversation, other_conversation, rejected_call):
    client.force_login(auditor)
    changelist = url("conversations_providercall_changelist")

    def ids(params):
        response = client.get(changelist, params)
        assert response.status_code == 200
        return {c.request_id for c in response.context["cl"].result_list}

    assert ids({"q": "req_pw_2"}) == {"req_pw_2"}
    assert ids({"q": "REQ_PW_2"}) == set(), "request ids are matched exactly"
    assert ids({"status__exact": "refused"}) == {"req_bad_key"}
    assert ids({"outcome__exact": "degraded"}) == {"req_inv_2"}
    assert ids({"model_used": "gpt-4o"}) == {"req_inv_1", "req_inv_2"}
    assert ids({"application__id__exact": other_conversation.application_id}) == {"req_inv_1", "req_inv_2"}
    assert ids({"conversation__id__exact": conversation.pk}) == {"req_pw_1", "req_pw_2", "req_pw_3"}
    assert ids({"stream__exact": "0"}) == {"req_pw_1", "req_pw_2", "req_pw_3", "req_inv_1", "req_inv_2", "req_bad_key"}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="reads a Postgres query plan")
@pytest.mark.parametrize(
    ("changelist", "query", "index"),
    [
        ("conversations_providercall_changelist", {"q": "req_pw_2"}, "call_request_id_idx"),
        ("conversations_conversation_changelist", {"end_user": "alice@example.com"}, "conversation_end_user_idx"),
    ],
)
def test_lookups_support_makes_are_answered_by_an_index(client, auditor, conversation, changelist, query, index):
    """Among millions of calls or conversations these must not read them all:
    an iexact search (UPPER(request_id) = UPPER(...)) could not use the index."""
    client.force_login(auditor)
    queryset = client.get(url(changelist), query).context["cl"].queryset
    with connection.cursor() as cur:
        cur.execute("SET enable_seqscan = off")
        try:
            plan = queryset.explain()
        finally:
            cur.execute("RESET enable_seqscan")
    assert index in plan, plan


# --- Traffic is read-only for everyone -------------------------------------------------------


def test_traffic_cannot_be_changed_even_by_a_superuser(client, superuser, conversation):
    client.force_login(superuser)
    call = conversation.calls.first()
    for target in [
        url("conversations_conversation_change", conversation.pk),
        url("conversations_conversation_delete", conversation.pk),
        url("conversations_conversation_add"),
        url("conversations_providercall_change", call.pk),
        url("conversations_providercall_delete", call.pk),
        url("conversations_providercall_add"),
    ]:
        response = client.post(target, {"title": "rewritten", "post": "yes"})
        assert response.status_code == 403, target
    # Bulk delete through the changelist action is not offered either.
    response = client.post(
        url("conversations_conversation_changelist"),
        {"action": "delete_selected", "_selected_action": [conversation.pk], "post": "yes"},
    )
    assert Conversation.objects.filter(pk=conversation.pk).exists()
    conversation.refresh_from_db()
    assert conversation.title == "How do I reset my password?"
    assert Message.objects.filter(conversation=conversation).count() == 2 + 4 + 6 + 3


def test_messages_have_no_admin_of_their_own(client, superuser):
    client.force_login(superuser)
    with pytest.raises(Exception):
        url("conversations_message_changelist")


def test_read_only_pages_offer_no_save_or_delete(client, superuser, conversation):
    client.force_login(superuser)
    html = client.get(url("conversations_conversation_change", conversation.pk)).content.decode()
    assert 'name="_save"' not in html and "deletelink" not in html
    listing = client.get(url("conversations_conversation_changelist")).content.decode()
    assert "delete_selected" not in listing
    assert reverse("admin:conversations_conversation_add") not in listing


# --- Auditors change nothing; managers change prices with history ----------------------------


def price_form(price: ModelPrice, **overrides) -> dict:
    data = {
        "model": price.model_id,
        "effective_from_0": price.effective_from.strftime("%Y-%m-%d"),
        "effective_from_1": price.effective_from.strftime("%H:%M:%S"),
        "input_per_million": str(price.input_per_million),
        "cached_input_per_million": str(price.cached_input_per_million or ""),
        "output_per_million": str(price.output_per_million),
        "note": price.note,
    }
    data.update(overrides)
    return data


def change_form_data(client, page: str, **overrides) -> dict:
    """What a browser would post back from the change form at `page`,
    unchanged except for `overrides`: robust to fields added to the model
    later. Inline formsets go back as they came (management form and ids)."""
    from django import forms

    response = client.get(page)
    assert response.status_code == 200
    data: dict = {}
    form = response.context["adminform"].form
    for name, field in form.fields.items():
        value = form[name].value()
        if isinstance(field.widget, forms.CheckboxInput):
            if value:
                data[name] = "on"
        elif value is not None:
            data[name] = value
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        management = formset.management_form
        for name in management.fields:
            data[f"{formset.prefix}-{name}"] = management[name].value()
        for i, inline_form in enumerate(formset.initial_forms):
            data[f"{formset.prefix}-{i}-id"] = inline_form.instance.pk
    for name, value in overrides.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def application_form(client, application: Application, **overrides) -> dict:
    return change_form_data(client, url("governance_application_change", application.pk), **overrides)


def test_auditor_cannot_change_configuration(client, auditor, superuser, app, catalogue):
    client.force_login(superuser)
    hacked = application_form(client, app, name="Hacked")
    client.force_login(auditor)
    response = client.post(url("budgets_modelprice_change", catalogue.pk), price_form(catalogue, input_per_million="9"))
    assert response.status_code == 403
    response = client.post(url("governance_application_change", app.pk), hacked)
    assert response.status_code == 403
    for page in [url("budgets_modelprice_add"), url("governance_application_add"), url("governance_apikey_add")]:
        assert client.get(page).status_code == 403, page
    catalogue.refresh_from_db()
    app.refresh_from_db()
    assert catalogue.input_per_million == Decimal("0.15") and app.name == "Support Bot"
    # The change page is a read-only view without a save button.
    html = client.get(url("budgets_modelprice_change", catalogue.pk)).content.decode()
    assert 'name="_save"' not in html


def test_auditor_sees_history_but_cannot_revert(client, manager, auditor, catalogue):
    client.force_login(manager)
    assert client.post(url("budgets_modelprice_change", catalogue.pk), price_form(catalogue, input_per_million="0.20")).status_code == 302
    client.force_login(auditor)
    history = client.get(url("budgets_modelprice_history", catalogue.pk))
    assert history.status_code == 200
    assert "manon" in history.content.decode()
    first = catalogue.history.earliest()
    version_url = reverse("admin:budgets_modelprice_simple_history", args=[catalogue.pk, first.history_id])
    assert client.get(version_url).status_code == 200
    # simple_history would let a viewer POST the revert form; this admin refuses.
    assert client.post(version_url, price_form(catalogue, input_per_million="0.15")).status_code == 403
    catalogue.refresh_from_db()
    assert catalogue.input_per_million == Decimal("0.20")


def test_manager_changes_a_price_and_history_names_the_manager(client, manager, catalogue):
    client.force_login(manager)
    response = client.post(
        url("budgets_modelprice_change", catalogue.pk), price_form(catalogue, output_per_million="0.75")
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    catalogue.refresh_from_db()
    assert catalogue.output_per_million == Decimal("0.75")
    latest = catalogue.history.latest()
    assert latest.history_type == "~" and latest.history_user == manager
    # Managers may not delete prices.
    assert client.post(url("budgets_modelprice_delete", catalogue.pk), {"post": "yes"}).status_code == 403


def test_manager_adds_a_price_version_inline_on_the_model(client, manager, catalogue):
    client.force_login(manager)
    model = catalogue.model
    later = timezone.now() + timedelta(days=7)
    data = {
        "name": model.name,
        "upstream_name": "",
        "encoding": model.encoding,
        "context_window": model.context_window,
        "is_active": "on",
        "prices-TOTAL_FORMS": "2",
        "prices-INITIAL_FORMS": "1",
        "prices-MIN_NUM_FORMS": "0",
        "prices-MAX_NUM_FORMS": "1000",
        "prices-0-id": catalogue.pk,
        "prices-0-model": model.pk,
        **{f"prices-0-{k}": v for k, v in price_form(catalogue).items() if k != "model"},
        "prices-1-model": model.pk,
        "prices-1-effective_from_0": later.strftime("%Y-%m-%d"),
        "prices-1-effective_from_1": "00:00:00",
        "prices-1-input_per_million": "0.10",
        "prices-1-cached_input_per_million": "0.05",
        "prices-1-output_per_million": "0.40",
        "prices-1-note": "announced cut",
    }
    response = client.post(url("budgets_languagemodel_change", model.pk), data)
    assert response.status_code == 302, response.content.decode()[:3000]
    new = ModelPrice.objects.get(model=model, note="announced cut")
    assert new.history.get().history_user == manager


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        ({"input_per_million": "-1"}, "input_per_million", "greater than or equal to 0"),
        ({"cached_input_per_million": "0.50"}, "cached_input_per_million", "Cached input cannot cost more"),
    ],
)
def test_bad_price_input_is_a_form_error(client, manager, catalogue, overrides, field, message):
    client.force_login(manager)
    before = catalogue.history.count()
    response = client.post(url("budgets_modelprice_change", catalogue.pk), price_form(catalogue, **overrides))
    assert response.status_code == 200
    form = response.context["adminform"].form
    assert field in form.errors and message in str(form.errors[field])
    catalogue.refresh_from_db()
    assert catalogue.input_per_million == Decimal("0.15") and catalogue.cached_input_per_million == Decimal("0.075")
    assert catalogue.history.count() == before

    count = ModelPrice.objects.count()
    response = client.post(
        url("budgets_modelprice_add"),
        price_form(catalogue, effective_from_0=(timezone.now() + timedelta(days=3)).strftime("%Y-%m-%d"), **overrides),
    )
    assert response.status_code == 200 and field in response.context["adminform"].form.errors
    assert ModelPrice.objects.count() == count


def test_modelprice_list_marks_the_version_in_force(client, manager, catalogue):
    future = ModelPrice.objects.create(
        model=catalogue.model,
        effective_from=timezone.now() + timedelta(days=10),
        input_per_million=Decimal("0.10"),
        output_per_million=Decimal("0.40"),
    )
    client.force_login(manager)
    response = client.get(url("budgets_modelprice_changelist"), {"model__id__exact": catalogue.model_id})
    rows = response.context["cl"].result_list
    in_force = next(f for f in response.context["cl"].list_display if getattr(f, "__name__", "") == "in_force")
    assert {p.pk: in_force(p) for p in rows} == {catalogue.pk: True, future.pk: False}
    assert "icon-yes.svg" in response.content.decode() and "$0.150000" in response.content.decode()


# --- Applications: the provider key is never shown --------------------------------------------


def test_provider_key_is_never_displayed_and_kept_when_blank(client, superuser, auditor, manager, app):
    secret = "sk-live-should-never-appear-1234567890"
    Application.objects.filter(pk=app.pk).update(provider_api_key=secret)
    for user in (superuser, auditor, manager):
        client.force_login(user)
        html = client.get(url("governance_application_change", app.pk)).content.decode()
        assert secret not in html and "A key is stored" in html
        assert secret not in client.get(url("governance_application_changelist")).content.decode()

    client.force_login(manager)
    response = client.post(url("governance_application_change", app.pk), application_form(client, app, name="Support bot v2"))
    assert response.status_code == 302, response.content.decode()[:3000]
    app.refresh_from_db()
    assert app.name == "Support bot v2" and app.provider_api_key == secret
    assert app.history.latest().history_user == manager

    client.post(url("governance_application_change", app.pk), application_form(client, app, provider_api_key="sk-new-key"))
    app.refresh_from_db()
    assert app.provider_api_key == "sk-new-key"
    replaced = app.history.latest()
    assert replaced.history_user == manager and replaced.provider_key_fingerprint == key_fingerprint("sk-new-key")
    assert replaced.diff_against(replaced.prev_record).changed_fields == ["provider_key_fingerprint"]

    client.post(url("governance_application_change", app.pk), application_form(client, app, clear_provider_api_key="on"))
    app.refresh_from_db()
    assert app.provider_api_key == ""
    assert app.history.latest().provider_key_fingerprint == ""

    # The history screen says when the key changed, and never what it is.
    client.force_login(auditor)
    history = client.get(url("governance_application_history", app.pk)).content.decode()
    assert key_fingerprint("sk-new-key") in history
    assert "sk-new-key" not in history and secret not in history


def test_application_default_model_must_be_catalogued(client, manager, app):
    client.force_login(manager)
    response = client.post(url("governance_application_change", app.pk), application_form(client, app, default_model="gpt-9"))
    assert response.status_code == 200
    assert "default_model" in response.context["adminform"].form.errors


# --- API keys ------------------------------------------------------------------------------------


def test_adding_a_key_shows_the_secret_once_and_stores_its_hash(client, manager, app):
    client.force_login(manager)
    response = client.post(url("governance_apikey_add"), {"application": app.pk, "name": "web widget"}, follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    secret_message = next(m for m in shown if "Copy it now, it will not be shown again" in m)
    secret = re.search(r"(gk-[A-Za-z0-9_\-]+)", secret_message).group(1)

    key = ApiKey.objects.get(name="web widget")
    assert key.key_hash == hash_key(secret)
    assert key.prefix == secret[:11] and key.created_by == manager
    assert key.history.get().history_user == manager
    html = response.content.decode()
    assert key.key_hash not in html

    # Never again: not on the key's page, not in the list.
    again = client.get(url("governance_apikey_change", key.pk))
    assert secret not in again.content.decode() and not list(get_messages(again.wsgi_request))
    assert secret not in client.get(url("governance_apikey_changelist")).content.decode()


def test_revoking_keys_with_the_action(client, manager, app):
    first = create_api_key(application=app, name="a").api_key
    second = create_api_key(application=app, name="b").api_key
    untouched = create_api_key(application=app, name="c").api_key
    client.force_login(manager)
    response = client.post(
        url("governance_apikey_changelist"),
        {"action": "revoke_keys", "_selected_action": [first.pk, second.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert any("Revoked 2 keys" in str(m) for m in response.context["messages"])
    for key in (first, second):
        key.refresh_from_db()
        assert key.revoked_at is not None
        assert key.history.latest().history_user == manager
    untouched.refresh_from_db()
    assert untouched.revoked_at is None


def test_revoke_button_on_the_key_page(client, manager, auditor, app):
    key = create_api_key(application=app, name="a").api_key
    revoke = reverse("admin:governance_apikey_revoke", args=[key.pk])
    client.force_login(auditor)
    assert "Revoke this key" not in client.get(url("governance_apikey_change", key.pk)).content.decode()
    assert client.post(revoke).status_code == 403
    client.force_login(manager)
    assert "Revoke this key" in client.get(url("governance_apikey_change", key.pk)).content.decode()
    assert client.get(revoke).status_code == 405
    assert client.post(revoke).status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_keys_cannot_be_edited_deleted_or_reverted(client, superuser, app):
    key = create_api_key(application=app, name="a").api_key
    client.force_login(superuser)
    assert client.post(url("governance_apikey_change", key.pk), {"name": "renamed"}).status_code == 403
    assert client.post(url("governance_apikey_delete", key.pk), {"post": "yes"}).status_code == 403
    version = key.history.get()
    assert (
        client.post(reverse("admin:governance_apikey_simple_history", args=[key.pk, version.history_id]), {}).status_code
        == 403
    )
    html = client.get(url("governance_apikey_change", key.pk)).content.decode()
    assert 'name="name"' not in html and key.key_hash not in html
    key.refresh_from_db()
    assert key.name == "a"


def test_auditor_cannot_revoke_with_the_action(client, auditor, app):
    key = create_api_key(application=app, name="a").api_key
    client.force_login(auditor)
    client.post(url("governance_apikey_changelist"), {"action": "revoke_keys", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is None


# --- Roles ---------------------------------------------------------------------------------------


def test_roles_are_created_by_the_migration():
    groups = {g.name: {f"{p.content_type.app_label}.{p.codename}" for p in g.permissions.select_related("content_type")}
              for g in Group.objects.all()}
    assert set(groups) >= {r.name for r in ROLES}
    auditor = groups[AUDITOR]
    assert {"conversations.view_conversation", "budgets.view_historicalmodelprice", "auth.view_user"} <= auditor
    assert not any(p.split(".")[1].startswith(("add_", "change_", "delete_")) for p in auditor)
    manager = groups[MANAGER]
    assert {"budgets.change_modelprice", "governance.add_apikey", "governance.change_apikey"} <= manager
    assert {p for p in manager if ".delete_" in p} == {
        "budgets.delete_degradationrule", "budgets.delete_steppolicy", "governance.delete_fallbackroute"
    }
    assert groups[ON_CALL] == {"conversations.view_providercall", "budgets.view_costevent"}
    assert sync_roles() == sync_roles()  # idempotent


def test_support_agent_and_on_call_see_only_traffic(client, conversation, app):
    agent = make_user(username="sam", role=SUPPORT_AGENT)
    client.force_login(agent)
    assert client.get(url("conversations_conversation_change", conversation.pk)).status_code == 200
    assert client.get(url("governance_application_changelist")).status_code == 403
    assert client.get(url("configuration_changes")).status_code == 403

    oncall = make_user(username="otto", role=ON_CALL)
    client.force_login(oncall)
    assert client.get(url("conversations_conversation_changelist")).status_code == 403
    response = client.get(url("conversations_providercall_changelist"))
    assert response.status_code == 200
    # Links only where the user may follow them.
    assert reverse("admin:governance_application_change", args=[app.pk]) not in response.content.decode()
    call = conversation.calls.first()
    detail = client.get(url("conversations_providercall_change", call.pk)).content.decode()
    assert "How do I reset my password?" not in detail  # messages need view_message


# --- Configuration changes screen -------------------------------------------------------------


def test_configuration_changes_lists_who_changed_what(client, manager, auditor, app, catalogue):
    client.force_login(manager)
    client.post(url("budgets_modelprice_change", catalogue.pk), price_form(catalogue, output_per_million="0.70"))
    client.post(url("governance_apikey_add"), {"application": app.pk, "name": "kiosk"})

    client.force_login(auditor)
    response = client.get(url("configuration_changes"))
    assert response.status_code == 200
    changes = response.context["changes"]
    price_change = next(c for c in changes if c.kind == "modelprice" and c.change_type == "~")
    assert price_change.user == manager
    assert [(f.field, f.old, f.new) for f in price_change.changes] == [
        ("output $ / 1M tokens", "0.600000", "0.700000")
    ]
    key_created = next(c for c in changes if c.kind == "apikey")
    assert key_created.change_type == "+" and key_created.user == manager
    html = response.content.decode()
    assert "key_hash" not in html and ApiKey.objects.get(name="kiosk").key_hash not in html
    assert changes[0].when >= changes[-1].when  # newest first

    by_model = client.get(url("configuration_changes"), {"model": "apikey"}).context["changes"]
    assert {c.kind for c in by_model} == {"apikey"}
    by_user = client.get(url("configuration_changes"), {"user": manager.pk}).context["changes"]
    assert by_user and all(c.user == manager for c in by_user)
    only_changed = client.get(url("configuration_changes"), {"type": "~"}).context["changes"]
    assert only_changed and all(c.change_type == "~" for c in only_changed)


def test_configuration_changes_paginates(client, superuser, catalogue):
    for i in range(60):
        ModelPrice.objects.create(
            model=catalogue.model,
            effective_from=timezone.now() + timedelta(days=i + 1),
            input_per_million=Decimal("1"),
            output_per_million=Decimal("2"),
        )
    client.force_login(superuser)
    first = client.get(url("configuration_changes"))
    assert len(first.context["changes"]) == 50
    second = client.get(url("configuration_changes"), {"p": 2})
    assert second.status_code == 200 and len(second.context["changes"]) >= 10
    assert first.context["paginator"].count >= 62


def test_index_links_the_audit_screen_for_auditors_only(client, auditor):
    client.force_login(auditor)
    html = client.get(url("index")).content.decode()
    assert reverse("admin:configuration_changes") in html and "GenAI governance" in html
    client.force_login(make_user(username="sam", role=SUPPORT_AGENT))
    assert reverse("admin:configuration_changes") not in client.get(url("index")).content.decode()


def test_call_page_and_timeline_show_retries_and_fallbacks(admin_client, db):
    from conversations.models import ProviderCall

    call = ProviderCall.objects.create(
        request_id="req-attempts", status="succeeded", outcome="answered", created_at=timezone.now(),
        attempts=[
            {"n": 1, "model": "gpt-4o", "retry": 0, "outcome": "http_500", "wait_ms": 180},
            {"n": 2, "model": "gpt-4o-mini", "retry": 0, "outcome": "ok"},
        ],
    )
    html = admin_client.get(reverse("admin:conversations_providercall_change", args=[call.pk])).content.decode()
    assert "Provider attempts" in html and "http_500" in html and "gpt-4o-mini" in html
