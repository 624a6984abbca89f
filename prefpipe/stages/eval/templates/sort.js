// Sort the gallery's cards by a data- attribute (a gain), or back to prompt order; click again to reverse.
function sortBy(key, btn) {
  const box = document.getElementById('gallery');
  const desc = key !== 'order' && btn.dataset.dir !== 'desc';
  document.querySelectorAll('button.sort').forEach(b => { b.dataset.dir = ''; b.classList.remove('on'); });
  btn.dataset.dir = desc ? 'desc' : 'asc';
  btn.classList.add('on');
  const val = c => { const v = parseFloat(c.dataset[key]); return isNaN(v) ? (desc ? -Infinity : Infinity) : v; };
  const cmp = (a, b) => { const x = val(a), y = val(b); return x === y ? 0 : (x < y ? -1 : 1); };
  [...box.children].sort((a, b) => desc ? cmp(b, a) : cmp(a, b)).forEach(c => box.appendChild(c));
}
