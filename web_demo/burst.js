/**
 * burst.js: "Make some traffic": creates BURST_SIZE users, updates each one, then deletes them all, through REST,
 * BURST_CONCURRENCY requests at a time. Each request is a transaction of its own, so the table shows each change.
 */
import { $ } from './dom.js';
import { request } from './rest.js';

const BURST_SIZE = 20;
const BURST_CONCURRENCY = 4;

/**
 * Run `task` over `items` with at most `limit` in flight, keeping results in input order.
 * @template T, R
 * @param {T[]} items @param {number} limit @param {(item: T) => Promise<R>} task
 * @returns {Promise<R[]>}
 */
async function inPool(items, limit, task) {
  const results = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const index = next++;
      results[index] = await task(items[index]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

export function wireBurst() {
  const button = $('burst');
  const status = $('burst-status');
  let running = false;

  button.addEventListener('click', async () => {
    // aria-disabled rather than disabled: a disabled button drops keyboard focus to <body>.
    if (running) return;
    running = true;
    button.setAttribute('aria-disabled', 'true');
    const started = performance.now();
    const tag = Math.random().toString(36).slice(2, 7);
    let failed = 0;
    /** @param {string} verb @param {number} total */
    const progress = (verb, total) => {
      let done = 0;
      status.textContent = `${verb} 0/${total}…`;
      return () => { status.textContent = `${verb} ${++done}/${total}…`; };
    };
    /** Successful results' bodies; failures are only counted. @param {any} result @returns {any[]} */
    const keep = (result) => {
      if (result.ok) return [result.data];
      failed += 1;
      return [];
    };

    const indexes = Array.from({ length: BURST_SIZE }, (_, i) => i + 1);
    let tick = progress('Creating', indexes.length);
    const created = (await inPool(indexes, BURST_CONCURRENCY, async (i) => {
      const result = await request('POST', '/users', { body: { name: `Burst ${tag} ${i}`, email: `burst-${tag}-${i}@example.com` } });
      tick();
      return result;
    })).flatMap(keep);

    tick = progress('Updating', created.length);
    const updated = (await inPool(created, BURST_CONCURRENCY, async (user) => {
      const result = await request('PATCH', `/users/${user.id}`, { body: { name: `${user.name} (edited)` }, version: user.version });
      tick();
      return result;
    })).flatMap(keep);

    tick = progress('Deleting', updated.length);
    const deleted = (await inPool(updated, BURST_CONCURRENCY, async (user) => {
      const result = await request('DELETE', `/users/${user.id}`, { version: user.version });
      tick();
      return result;
    })).flatMap(keep);

    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    status.textContent = `Done in ${seconds} s: ${created.length} created, ${updated.length} updated, `
      + `${deleted.length} deleted${failed ? `, ${failed} requests failed` : ''}.`;
    button.removeAttribute('aria-disabled');
    running = false;
  });
}
