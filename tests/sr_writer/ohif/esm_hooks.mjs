// Module loading hook for Node.js before 20.19, which takes a .js file for CommonJS unless its package says
// "type": "module": the ES module builds that OHIF's packages ship that way (dcmjs's build/dcmjs.es.js, the
// dist/esm folders of Cornerstone) are loaded as the ES modules they are. Newer Node.js detects them by itself.
const ESM_BUILD = /\/node_modules\/.+(\.es\.js|\/esm\/.+\.js)$/;

export async function load(url, context, nextLoad) {
  if (url.startsWith('file:') && ESM_BUILD.test(url)) {
    return nextLoad(url, { ...context, format: 'module' });
  }
  return nextLoad(url, context);
}
