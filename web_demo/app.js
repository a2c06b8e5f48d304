/**
 * app.js: the demo page's entry point. One live view of `users` (realtime.js `LiveView`, a snapshot subscription
 * kept current one whole transaction at a time) feeds the table; every write goes through the REST API and shows
 * up here only because the change stream delivers it, in this tab and in every other.
 *
 * The page is plain ES modules, one concern each, loaded by the browser with no build step:
 *   app.js          this file: builds the client and wires the modules below, in order
 *   live-table.js   the live view of `users`, the filter form, the seq and subscription displays
 *   users-table.js  the table drawn from the view, inline editing, conflicts and delete
 *   create-form.js  the "Add a user" form          burst.js      "Make some traffic"
 *   signin.js       the token (fragment, form, "Sign in as") and who the server says the page is
 *   connection.js   the connection state           event-log.js  the "Live events" list
 *   rest.js         REST calls with the page's token           dom.js   DOM and time helpers
 *
 * Against a server with a token key, give the page a bearer token in the URL fragment, `/#token=<JWT>` (never
 * the query string, which servers and proxies log), or paste one into the form the page shows when the server
 * refuses it. The page takes the token out of the address bar at once, streams with it and sends it on every
 * REST request. Without one the page works as against an open server.
 *
 * The same panel offers "Sign in as" a user id and role: the page asks `POST /auth/dev-token` for a token (a
 * server signs them only with AUTH_DEV_TOKENS on; otherwise the route does not exist and the page says how to
 * mint one with `realtime token`). The server's refusal of a token-less page is the one signal that tokens are
 * on: the client's status becomes `unauthorized`, which shows the panel. Under a row-level policy the rows and
 * columns the page shows are the ones the server sends for its token; a withheld column shows as a dash.
 *
 * Hooks for browser tests (values of `data-testid`):
 *   status                 connection state; text is exactly `connecting`, `live`, `reconnecting`, `offline` or
 *                          `unauthorized` (the server refused the token, or there is none; the token form shows)
 *   token-form             the token form, shown only while the status is `unauthorized`, with token-input,
 *                          token-submit and token-message (why the server refused)
 *   signin-form            "Sign in as", beside the token form: signin-sub (user id), signin-role (member|admin),
 *                          signin-submit, and signin-message (why no token came, e.g. how to mint one instead)
 *   identity               who the server says the token is (`<sub> · <role>`), shown once it accepted one,
 *                          with sign-out (reloads the page without the token)
 *   seq                    the position the table shows: its snapshot's, then the last change applied (a change
 *                          of an unfinished transaction counts once its transaction is applied); `—` before the first
 *   subscription           state of the table's subscription; text is exactly `pending`, `live`, `retrying`
 *                          (the server answered `unavailable`; asked again after a delay) or `failed`
 *   create-form            the "Add a user" form, with fields create-name, create-email and button create-submit
 *   error-name, error-email, error-form   inline errors of that form; empty text when there is none
 *   create-status          confirmation after a successful create
 *   users-body             the table body; `data-renders` counts the live view's steps drawn (its snapshot, then
 *                          one per transaction, however many rows it changed)
 *   user-row               one per displayed user; `data-id` = user id, `data-flash` = insert|update while tinted
 *   user-row-removed       a deleted row during its fade-out (it is removed from the DOM right after)
 *   user-id, user-name, user-email, user-version, user-updated-at   the cells of a row; a cell of a column the
 *                          server withheld (a row-level policy) has `data-withheld` and the text `—`
 *   edit, delete           per-row buttons while the row is read-only
 *   edit-name, edit-email, save, cancel    per-row inputs and buttons while the row is being edited
 *   row-error-name, row-error-email        field errors of a row being edited
 *   row-message            per-row outcome or conflict text (409, 412, 404, ...)
 *   reload                 "Reload row" button offered in row-message after a conflict
 *   user-count             number of users in the current view
 *   filter-form, filter-column, filter-op, filter-value, filter-apply, filter-clear   the row filter
 *   filter-error           why a filter could not be applied; filter-active: the filter in force, in words
 *   burst, burst-status    the traffic generator and its progress / outcome
 *   event-log              the live event list, newest first, at most 200 entries
 *   event-log-entry        one entry: `data-kind` = change|info|warn|error; changes also carry
 *                          `data-op`, `data-seq`, `data-id` and `data-latency` (ms)
 *   log-clear              empties the event log
 */
import { wireBurst } from './burst.js';
import { wireConnection } from './connection.js';
import { wireCreateForm } from './create-form.js';
import { wireLogClear } from './event-log.js';
import { showSubscription, subscribeTable, wireFilter } from './live-table.js';
import { RealtimeClient } from './realtime.js';
import { currentToken, holdToken } from './rest.js';
import { takeTokenFromFragment, wireIdentity, wireSignIn, wireToken } from './signin.js';

// First of all: the token leaves the address bar before anything else can read or show it.
holdToken(takeTokenFromFragment());

// With no token the client sends none, exactly as on an open server.
const rt = new RealtimeClient('/ws', currentToken() ? { getToken: () => currentToken() ?? '' } : {});

wireConnection(rt, showSubscription);
wireIdentity(rt);
wireToken(rt);
wireSignIn();
wireCreateForm();
wireFilter(rt);
wireBurst();
wireLogClear();
subscribeTable(rt, null);
rt.connect();
