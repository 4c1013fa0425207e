// Pan, zoom, "fit to bench", the millimetre grid and the scale bar.
//
// The camera maps world millimetres (y up) to SVG pixels: screen = (tx + k·x, ty − k·y). The
// bench group gets that as one transform, so items keep their data's coordinates. The grid is
// drawn in screen space for the visible area only (a few hundred lines at any zoom), with a
// step that keeps its lines at least MIN_GRID_PX apart, like the app's adaptive grid.

import { el } from './draw.js';

const MIN_GRID_PX = 12;
const FIT_MARGIN_PX = 48;
const MIN_K = 1e-4;
const MAX_K = 1e4;

/** The smallest of 1, 2, 5 × 10^n millimetres at least `mm` long. */
function niceStep(mm) {
  const power = 10 ** Math.floor(Math.log10(mm));
  for (const base of [1, 2, 5, 10]) {
    if (base * power >= mm) return { step: base * power, base };
  }
  return { step: 10 * power, base: 1 };
}

export class Viewport extends EventTarget {
  /**
   * @param {SVGSVGElement} svg
   * @param {SVGGElement} camera the group holding the bench, in world coordinates
   * @param {SVGGElement} grid a group drawn in screen coordinates, under the camera
   * @param {SVGGElement} scaleBar a group drawn in screen coordinates, over everything
   */
  constructor(svg, camera, grid, scaleBar) {
    super();
    Object.assign(this, { svg, camera, grid, scaleBar });
    this.k = 2;
    this.tx = 0;
    this.ty = 0;
    this.panning = null;
    this.listen();
    new ResizeObserver(() => this.apply()).observe(svg);
    this.apply();
  }

  size() {
    const box = this.svg.getBoundingClientRect();
    return { width: box.width || 1, height: box.height || 1, left: box.left, top: box.top };
  }

  /** World millimetres under a client (page) point. */
  toWorld(clientX, clientY) {
    const { left, top } = this.size();
    return [(clientX - left - this.tx) / this.k, (this.ty - (clientY - top)) / this.k];
  }

  /** Shows every point, with a margin; keeps the zoom when there is nothing to show. */
  fit(points) {
    if (points.length === 0) return;
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]);
    const [minX, maxX, minY, maxY] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const { width, height } = this.size();
    const spanX = Math.max(maxX - minX, 10);
    const spanY = Math.max(maxY - minY, 10);
    this.k = Math.min(
      MAX_K,
      Math.max(MIN_K, Math.min((width - 2 * FIT_MARGIN_PX) / spanX, (height - 2 * FIT_MARGIN_PX) / spanY)),
    );
    this.tx = width / 2 - this.k * (minX + maxX) / 2;
    this.ty = height / 2 + this.k * (minY + maxY) / 2;
    this.apply();
  }

  zoomAt(clientX, clientY, factor) {
    const { left, top } = this.size();
    const [wx, wy] = this.toWorld(clientX, clientY);
    this.k = Math.min(MAX_K, Math.max(MIN_K, this.k * factor));
    this.tx = clientX - left - this.k * wx;
    this.ty = clientY - top + this.k * wy;
    this.apply();
  }

  listen() {
    this.svg.addEventListener('wheel', (event) => {
      event.preventDefault();
      this.zoomAt(event.clientX, event.clientY, Math.exp(-event.deltaY * 0.0015));
    }, { passive: false });
    // Dragging the background pans; dragging an item is drag.js's (it stops propagation).
    this.svg.addEventListener('pointerdown', (event) => {
      if (event.button !== 0 && event.button !== 1) return;
      this.panning = { x: event.clientX, y: event.clientY, tx: this.tx, ty: this.ty, id: event.pointerId };
      this.svg.setPointerCapture(event.pointerId);
      this.svg.classList.add('panning');
    });
    this.svg.addEventListener('pointermove', (event) => {
      if (!this.panning || event.pointerId !== this.panning.id) return;
      this.tx = this.panning.tx + event.clientX - this.panning.x;
      this.ty = this.panning.ty + event.clientY - this.panning.y;
      this.apply();
    });
    const stop = (event) => {
      if (this.panning?.id !== event.pointerId) return;
      this.panning = null;
      this.svg.classList.remove('panning');
    };
    this.svg.addEventListener('pointerup', stop);
    this.svg.addEventListener('pointercancel', stop);
  }

  apply() {
    this.camera.setAttribute('transform', `translate(${this.tx} ${this.ty}) scale(${this.k} ${-this.k})`);
    this.drawGrid();
    this.dispatchEvent(new Event('change'));
  }

  drawGrid() {
    const { width, height } = this.size();
    const { step, base } = niceStep(MIN_GRID_PX / this.k);
    const major = step * (base === 2 ? 5 : 10);
    const [x0, y1] = [-this.tx / this.k, this.ty / this.k];
    const [x1, y0] = [(width - this.tx) / this.k, (this.ty - height) / this.k];
    const minor = [];
    const majors = [];
    const sx = (x) => (this.tx + this.k * x).toFixed(1);
    const sy = (y) => (this.ty - this.k * y).toFixed(1);
    for (let i = Math.ceil(x0 / step); i * step <= x1; i += 1) {
      const x = i * step;
      (Math.abs(x / major - Math.round(x / major)) < 1e-9 ? majors : minor).push(`M${sx(x)},0V${height}`);
    }
    for (let i = Math.ceil(y0 / step); i * step <= y1; i += 1) {
      const y = i * step;
      (Math.abs(y / major - Math.round(y / major)) < 1e-9 ? majors : minor).push(`M0,${sy(y)}H${width}`);
    }
    this.grid.replaceChildren();
    el('path', { d: minor.join(''), class: 'grid-minor' }, this.grid);
    el('path', { d: majors.join(''), class: 'grid-major' }, this.grid);
    // The axes through the origin, dashed as in the app.
    el('path', { d: `M${sx(0)},0V${height}M0,${sy(0)}H${width}`, class: 'grid-axis' }, this.grid);

    // Scale bar: one major step.
    const px = major * this.k;
    this.scaleBar.replaceChildren();
    const y = height - 18;
    el('rect', { x: 10, y: y - 14, width: px + 90, height: 26, rx: 5, class: 'scale-box' }, this.scaleBar);
    el('rect', { x: 18, y: y - 4, width: px, height: 6, class: 'scale-bar' }, this.scaleBar);
    const text = el('text', { x: 26 + px, y: y + 3, class: 'scale-text' }, this.scaleBar);
    text.textContent = major >= 1000 ? `${major / 1000} m` : `${+major.toPrecision(6)} mm`;
  }
}
