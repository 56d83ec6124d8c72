"""The admin screens that matter, driven in a real headless chromium.

Uses Debian's /usr/bin/chromium through Playwright's sync API (never
`playwright install`) against pytest-django's live_server.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from django.conf import settings

from budgets.models import ModelPrice
from governance.roles import AUDITOR, MANAGER, sync_roles
from tests.factories import PASSWORD, Turn, make_application, make_conversation, make_model, make_rejected_call, make_user

# Playwright's sync API runs an event loop in this thread; the test's own ORM
# calls are still synchronous and safe.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(settings.BASE_DIR) / "var" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    from django.db import connections

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
            # Playwright's sync API runs the test in a context of its own, and
            # Django's connections are per context: what the test opened here
            # is handed back here, or the test database cannot be dropped.
            connections.close_all()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


@pytest.fixture
def scenario(transactional_db):
    # Transactional tests flush tables between tests, data migrations included:
    # recreate the role groups, as a deployment would with sync_roles().
    sync_roles()
    _, price = make_model(name="gpt-4o-mini")
    app = make_application(slug="support-bot", name="Support bot")
    other = make_application(slug="sales-bot", name="Sales bot")
    conversation = make_conversation(
        application=app,
        price=price,
        external_id="chat-password",
        end_user="alice@example.com",
        turns=[
            Turn("How do I reset my password?", "Open Settings › Security and choose “Reset password”.",
                 request_id="req_pw_1"),
            Turn("The reset link says it expired.", "Reset links last 15 minutes. Request a new one and use it right away.",
                 request_id="req_pw_2", decisions=[{"type": "pii_masking", "masked": ["email"], "count": 1}]),
            Turn("Thanks, that worked!", None, request_id="req_pw_3"),
            Turn("Thanks, that worked!", "Glad it helped! Anything else?", request_id="req_pw_4", outcome="degraded",
                 decisions=[{"type": "degradation", "from": "gpt-4o", "to": "gpt-4o-mini", "reason": "budget 80%"}]),
        ],
        model_requested="gpt-4o",
    )
    make_conversation(
        application=other,
        price=price,
        external_id="chat-invoice",
        end_user="bob@example.com",
        turns=[Turn("Where is my March invoice?", "Under Billing › History.", request_id="req_inv_1")],
    )
    make_rejected_call(request_id="req_bad_key")
    return {
        "price": price,
        "app": app,
        "conversation": conversation,
        "auditor": make_user(username="audrey", role=AUDITOR),
        "manager": make_user(username="manon", role=MANAGER),
    }


def login(page, base: str, username: str) -> None:
    page.goto(f"{base}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")
    assert "GenAI governance" in page.inner_text("#site-name")


def test_auditor_finds_a_conversation_and_reads_its_timeline(live_server, page, scenario):
    base = live_server.url
    login(page, base, "audrey")

    page.goto(f"{base}/admin/conversations/conversation/")
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 2

    # Filter by application, using the sidebar link.
    page.locator("#changelist-filter").get_by_role("link", name="support-bot").click()
    page.wait_for_url(re.compile(r"application__id__exact="))
    assert rows.count() == 1
    assert "chat-password" in rows.first.inner_text()

    # Search a request id.
    page.goto(f"{base}/admin/conversations/conversation/")
    page.fill("#searchbar", "req_pw_2")
    page.press("#searchbar", "Enter")
    page.wait_for_url(re.compile(r"q=req_pw_2"))
    assert rows.count() == 1
    rows.first.locator("th a").click()

    # The timeline.
    page.wait_for_selector(".gov-timeline")
    cards = page.locator(".gov-call")
    assert cards.count() == 4
    second = page.locator('.gov-call[data-request-id="req_pw_2"]')
    assert "Reset links last 15 minutes" in second.locator(".gov-answer").inner_text()
    assert second.locator(".gov-messages .gov-msg.gov-role-user").count() == 1  # only the new turn
    assert "The reset link says it expired." in second.locator(".gov-messages").inner_text()
    cost = second.locator(".gov-cost").inner_text()
    assert re.fullmatch(r"\$0\.\d{6}", cost), cost
    assert "pii_masking" in second.inner_text()
    assert "gpt-4o → gpt-4o-mini" in second.inner_text()

    # The full request is folded away until asked for.
    full = second.locator("details.gov-full-request")
    assert not full.locator(".gov-msg").first.is_visible()
    full.locator("summary").click()
    assert full.locator(".gov-msg").count() == 4
    assert full.locator(".gov-msg").first.is_visible()
    full.locator("summary").click()

    failed = page.locator('.gov-call[data-request-id="req_pw_3"]')
    assert "provider_unavailable" in failed.locator(".gov-error").inner_text()

    # Read-only: no Save button anywhere.
    assert page.locator("input[name=_save], input[name=_continue], input[name=_addanother]").count() == 0
    assert page.get_by_role("button", name=re.compile("save", re.I)).count() == 0

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(".gov-timeline").screenshot(path=str(SCREENSHOTS / "timeline.png"))
    page.screenshot(path=str(SCREENSHOTS / "conversation-page.png"), full_page=True)

    # The call log includes refused calls that belong to no application.
    page.goto(f"{base}/admin/conversations/providercall/?q=req_bad_key")
    assert "invalid_api_key" in page.locator("#result_list").inner_text()


def test_manager_edits_a_price_and_history_names_the_manager(live_server, page, scenario):
    base = live_server.url
    price: ModelPrice = scenario["price"]
    login(page, base, "manon")

    page.goto(f"{base}/admin/budgets/modelprice/{price.pk}/change/")
    page.fill("#id_output_per_million", "0.720000")
    page.click("input[name=_save]")
    page.wait_for_url(re.compile(r"/admin/budgets/modelprice/$"))
    assert "was changed successfully" in page.inner_text(".messagelist")
    price.refresh_from_db()
    assert str(price.output_per_million) == "0.720000"

    # A bad value is a form error, nothing saved.
    page.goto(f"{base}/admin/budgets/modelprice/{price.pk}/change/")
    page.fill("#id_cached_input_per_million", "9")
    page.click("input[name=_save]")
    assert "Cached input cannot cost more than uncached input." in page.inner_text(".errorlist")

    page.goto(f"{base}/admin/budgets/modelprice/{price.pk}/history/")
    history = page.inner_text("#content")
    assert "manon" in history
    assert "0.720000" in history

    # The auditors' screen shows the same change.
    page.goto(f"{base}/admin/audit/configuration-changes/?model=modelprice")
    table = page.inner_text("#result_list")
    assert "manon" in table and "0.600000" in table and "0.720000" in table
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "configuration-changes.png"), full_page=True)


def test_manager_issues_a_key_and_sees_the_secret_once(live_server, page, scenario):
    base = live_server.url
    login(page, base, "manon")
    page.goto(f"{base}/admin/governance/apikey/add/")
    page.select_option("#id_application", label="support-bot")
    page.fill("#id_name", "kiosk")
    page.click("input[name=_save]")
    message = page.inner_text(".messagelist")
    assert "Copy it now, it will not be shown again" in message
    secret = re.search(r"gk-[A-Za-z0-9_\-]+", message).group(0)
    page.reload()
    assert secret not in page.content()
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("text=Revoke this key")
    page.wait_for_selector(".messagelist")
    assert "revoked" in page.inner_text(".messagelist")


def test_manager_sees_budget_utilisation_bars(live_server, page, scenario):
    """The budget list: one bar per budget, coloured by its warning thresholds."""
    import datetime as dt

    from django.db import transaction

    from budgets.services import reserve, settle
    from governance.services import create_api_key
    from tests.budget_helpers import D, make_budget, make_call

    app = scenario["app"]
    key = create_api_key(application=app, name="web widget").api_key
    now = dt.datetime.now(dt.timezone.utc)

    def spend(budget, amounts, *, hours_ago=(30, 12, 3, 1), held="0", tokens=1000):
        with transaction.atomic():
            for i, amount in enumerate(amounts):
                call = make_call(app, f"{budget.pk}-{i}")
                reserve(call_id=call.pk, budgets=[budget], end_user="", amount_usd=D(amount), tokens=tokens, ttl_s=600)
                settle(call_id=call.pk, cost_usd=D(amount), tokens=tokens)
                budget.periods.get().reservations.filter(call=call).update(
                    closed_at=now - dt.timedelta(hours=hours_ago[i % len(hours_ago)])
                )
            if D(held):
                call = make_call(app, f"{budget.pk}-held")
                reserve(call_id=call.pk, budgets=[budget], end_user="", amount_usd=D(held), tokens=tokens, ttl_s=600)

    org = make_budget(scope="organisation", limit_usd=D("500"), name="Organisation, monthly")
    spend(org, ["40", "55.25", "38.10", "27.5"])
    monthly = make_budget(application=app, limit_usd=D("50"), name="Support bot, monthly")
    spend(monthly, ["12", "14.5", "9.75", "4.1"], held="2.4")
    step = make_budget(application=app, scope="step", step="answer", period="day", tz="Europe/Paris",
                       limit_usd=D("5"), name="Answer step, daily")
    spend(step, ["1.9", "2.95"], hours_ago=(3, 1))
    make_budget(scope="api_key", api_key=key, limit_tokens=2_000_000, period="week", name="Web widget key, weekly")
    make_budget(application=app, scope="end_user", limit_usd=D("0.50"), period="day", name="Each end user, daily")

    base = live_server.url
    login(page, base, "manon")
    page.goto(f"{base}/admin/budgets/budget/")
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 5
    bars = page.locator("#result_list .gov-meter")
    assert bars.count() == 5

    def bar(name):
        row = page.locator("#result_list tbody tr", has=page.get_by_role("link", name=name, exact=True))
        meter = row.locator(".gov-meter")
        fill = meter.locator(".gov-meter-fill")
        return {
            "tone": meter.get_attribute("data-tone"),
            "percent": float(meter.get_attribute("data-percent")),
            "fill_px": fill.bounding_box()["width"],
            "track_px": meter.locator(".gov-meter-track").bounding_box()["width"],
            "colour": fill.evaluate("e => getComputedStyle(e).backgroundColor"),
        }

    green, amber, red = bar("Organisation, monthly"), bar("Support bot, monthly"), bar("Answer step, daily")
    assert (green["tone"], amber["tone"], red["tone"]) == ("ok", "warn", "bad")
    assert green["percent"] == 32.2 and amber["percent"] == 85.5 and red["percent"] == 97.0
    for b in (green, amber, red):
        # The drawn fill is the percentage of the track, in pixels.
        assert b["fill_px"] == pytest.approx(b["track_px"] * b["percent"] / 100, abs=1.5)
    assert len({green["colour"], amber["colour"], red["colour"]}) == 3
    assert "by period end" in rows.filter(has_text="Support bot, monthly").inner_text()
    assert "Each end user" in page.inner_text("#result_list")

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "budgets.png"), full_page=True)

    # The budget's own page shows the same bar, its periods and its warnings.
    page.get_by_role("link", name="Support bot, monthly", exact=True).click()
    page.wait_for_selector("#gov-recent-periods")
    assert page.locator(".gov-meter").first.get_attribute("data-percent") == "85.5"
    assert "reached 80%" in page.inner_text("#gov-recent-events")
    page.screenshot(path=str(SCREENSHOTS / "budget-page.png"), full_page=True)
