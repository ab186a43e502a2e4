// Loads DICOM SR files with OHIF 3.13's own SR code, headless, and prints what OHIF would draw (JSON on stdout).
//
// Usage: node load_sr.js REQUEST.json
//   REQUEST.json: [{"sr": "path/to/sr.dcm", "images": ["path/to/source.dcm", ...]}, ...]
//
// What runs is the published bundle of @ohif/extension-cornerstone-dicom-sr (the one OHIF 3.13 ships), with the
// real @ohif/core, @cornerstonejs/core, @cornerstonejs/tools, @cornerstonejs/adapters and dcmjs:
//   1. each file is read and naturalized by dcmjs (DicomMessage.readFile, DicomMetaDictionary.naturalizeDataset),
//      as OHIF's DICOM loaders do;
//   2. the extension's getSopClassHandlerModule() makes the SR's display set and its load() runs: this is OHIF's
//      TID 1500 reader (measurement groups, coordinates, labels) and its matching of measurements to the images of
//      a display set by SOP Instance UID and frame number (wadors: image IDs, parsed by @ohif/core's
//      MetadataProvider);
//   3. every matched measurement goes through the extension's addMeasurement, which converts the SCOORD to world
//      coordinates with @cornerstonejs/core (imageToWorldCoords) and adds a DICOMSRDisplay annotation to
//      @cornerstonejs/tools' annotation state; the annotations are read back from that state;
//   4. the text next to each box is computed as DICOMSRDisplayTool._getTextBoxLinesFromLabels does (its first
//      five labels, "<label>: <value>", with the tool's renaming table): that method lives on a canvas tool class
//      that needs a rendering viewport, so its three lines are restated here.
// Only the browser-only modules the bundle imports for its React viewports and toolbar (@ohif/extension-cornerstone,
// @ohif/ui-next, @ohif/i18n, the React SystemProvider) are replaced by empty stand-ins; the loading code uses none
// of them. Services OHIF's app would pass in (display sets, data source, notifications) are plain objects.
'use strict';

const fs = require('fs');
const path = require('path');
const Module = require('module');
const { pathToFileURL } = require('url');

// Node.js 18.19+ (Debian 12 ships 18.20): ES module builds without "type": "module" load as modules (esm_hooks.mjs).
if (typeof Module.register === 'function') {
  Module.register('./esm_hooks.mjs', pathToFileURL(__filename));
}

// Browser globals some bundles touch when they load (hotkeys, crypto, location); nothing here renders.
const noop = () => {};
const element = () => ({
  addEventListener: noop, removeEventListener: noop, attachEvent: noop, style: {}, setAttribute: noop,
  appendChild: noop,
});
globalThis.window = globalThis;
globalThis.self = globalThis;
globalThis.document = {
  ...element(), createElement: element, documentElement: element(), body: element(), head: element(),
  querySelector: () => null,
};
globalThis.HTMLDivElement = class HTMLDivElement {};
if (typeof globalThis.CustomEvent === 'undefined') {  // Node.js 18
  globalThis.CustomEvent = class CustomEvent extends Event {
    constructor(type, options = {}) {
      super(type, options);
      this.detail = options.detail === undefined ? null : options.detail;
    }
  };
}
if (typeof globalThis.navigator === 'undefined') {
  globalThis.navigator = { userAgent: 'node' };
}
globalThis.location = { origin: 'http://localhost', href: 'http://localhost/', search: '', pathname: '/' };

// Stand-ins for the modules the extension imports only for its UI.
const anything = new Proxy(function () {}, {
  get: (target, name) => (name === '__esModule' ? true : name === 'then' ? undefined : anything),
  apply: () => anything,
  construct: () => anything,
});
const STUBS = {
  '@ohif/extension-cornerstone': {
    __esModule: true,
    Enums: { CORNERSTONE_3D_TOOLS_SOURCE_NAME: 'Cornerstone3DTools', CORNERSTONE_3D_TOOLS_SOURCE_VERSION: '0.1' },
    default: {},
  },
  '@ohif/ui-next': anything,
  '@ohif/i18n': { __esModule: true, default: { t: text => text } },
  '@ohif/core/src/contextProviders/SystemProvider': { __esModule: true, useSystem: () => ({}) },
};
// The Cornerstone packages are ES modules, which Node.js before 20.19 cannot require(); they are imported first
// and handed to the bundles' require() calls (the same module instances either way).
const ESM_PACKAGES = [
  '@cornerstonejs/metadata', '@cornerstonejs/utils', '@cornerstonejs/core', '@cornerstonejs/tools',
  '@cornerstonejs/adapters',
];
const PRELOADED = {};
const originalLoad = Module._load;
Module._load = function (request, parent, isMain) {
  if (Object.prototype.hasOwnProperty.call(STUBS, request)) {
    return STUBS[request];
  }
  if (Object.prototype.hasOwnProperty.call(PRELOADED, request)) {
    return PRELOADED[request];
  }
  return originalLoad.call(this, request, parent, isMain);
};

const dcmjs = require('dcmjs');
let cornerstone;
let cornerstoneTools;
let extension;

async function loadPackages() {
  for (const name of ESM_PACKAGES) {
    PRELOADED[name] = await import(name);
  }
  cornerstone = PRELOADED['@cornerstonejs/core'];
  cornerstoneTools = PRELOADED['@cornerstonejs/tools'];
  require('@ohif/core');
  const extensionModule = require('@ohif/extension-cornerstone-dicom-sr');
  extension = extensionModule.default || extensionModule;
  // Image plane of every image ID: the image's pixel grid as world space (origin 0, unit spacing, identity
  // orientation), so world coordinates read back as the image's own (column, row).
  cornerstone.metaData.addProvider((type, imageId) => {
    if (type !== 'imagePlaneModule' || !planes.has(imageId)) return undefined;
    return planes.get(imageId);
  }, 10000);
}

// DICOMSRDisplayTool's renaming of label names in the text box (extension source, DICOMSRDisplayTool.ts).
const SHORT_NAMES = { 'Short Axis': 'W: ', 'Long Axis': 'L: ', AREA: 'Area: ', Length: '', CORNERSTONEFREETEXT: '' };
const textLines = labels =>
  (labels || []).slice(0, 5).map(l => `${SHORT_NAMES[l.label] !== undefined ? SHORT_NAMES[l.label] : l.label}: ${l.value}`);

function readNaturalized(file) {
  const buffer = fs.readFileSync(file);
  const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
  const dicomData = dcmjs.data.DicomMessage.readFile(arrayBuffer, { untilTag: '7FE00010', includeUntilTagValue: false });
  const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(dicomData.dict);
  dataset._meta = dcmjs.data.DicomMetaDictionary.namifyDataset(dicomData.meta);
  return dataset;
}

const planes = new Map();  // image ID -> image plane (see loadPackages)

function imageDisplaySet(files, index) {
  const imageIds = [];
  const byImageId = {};
  for (const file of files) {
    const ds = readNaturalized(file);
    const frames = Number(ds.NumberOfFrames || 1);
    for (let frame = 1; frame <= frames; frame++) {
      const imageId = `wadors:http://localhost/dicom-web/studies/${ds.StudyInstanceUID}/series/${ds.SeriesInstanceUID}` +
        `/instances/${ds.SOPInstanceUID}/frames/${frame}`;
      imageIds.push(imageId);
      byImageId[imageId] = { sopInstanceUID: ds.SOPInstanceUID, frame, file: path.basename(file) };
      planes.set(imageId, {
        frameOfReferenceUID: ds.FrameOfReferenceUID || 'none', rows: ds.Rows, columns: ds.Columns,
        imageOrientationPatient: [1, 0, 0, 0, 1, 0], rowCosines: [1, 0, 0], columnCosines: [0, 1, 0],
        imagePositionPatient: [0, 0, 0], pixelSpacing: [1, 1], rowPixelSpacing: 1, columnPixelSpacing: 1,
      });
    }
  }
  return { displaySetInstanceUID: `images-${index}`, imageIds, byImageId, unsupported: false, Modality: 'OT' };
}

async function loadOne(request, index) {
  const imageSet = imageDisplaySet(request.images || [], index);
  const notifications = [];
  const services = {
    displaySetService: {
      activeDisplaySets: [imageSet],
      EVENTS: { DISPLAY_SETS_ADDED: 'event::displaySetsAdded' },
      subscribe: () => ({ unsubscribe: noop }),
      getDisplaySetByUID: uid => (uid === imageSet.displaySetInstanceUID ? imageSet : undefined),
    },
    measurementService: { getSourceMappings: () => [] },
    customizationService: { getCustomization: () => undefined },
    uiNotificationService: { show: message => notifications.push(message) },
  };
  const dataSource = { getImageIdsForDisplaySet: ds => ds.imageIds || [] };
  const extensionManager = { getDataSources: () => [dataSource], getActiveDataSource: () => [dataSource] };
  const handlers = extension.getSopClassHandlerModule({ servicesManager: { services }, extensionManager });
  const sr = readNaturalized(request.sr);
  const handler = handlers.find(h => h.sopClassUids.includes(sr.SOPClassUID));
  if (!handler) {
    return { sr: request.sr, error: `no SOP class handler for ${sr.SOPClassUID}` };
  }
  cornerstoneTools.annotation.state.removeAllAnnotations();
  const [displaySet] = handler.getDisplaySetsFromSeries([sr]);
  try {
    await displaySet.load();
  } catch (error) {
    return { sr: request.sr, error: `load() threw: ${error && error.stack ? error.stack : error}` };
  }
  const annotations = cornerstoneTools.annotation.state.getAllAnnotations();
  const measurements = (displaySet.measurements || []).map(m => {
    const annotation = annotations.find(a => a.annotationUID === m.TrackingUniqueIdentifier);
    const image = m.imageId ? imageSet.byImageId[m.imageId] : undefined;
    const points = annotation
      ? annotation.data.handles.points.map(p => cornerstone.utilities.worldToImageCoords(m.imageId, p))
      : [];
    return {
      trackingIdentifier: m.TrackingIdentifier,
      trackingUniqueIdentifier: m.TrackingUniqueIdentifier,
      graphicType: m.graphicType,
      loaded: m.loaded === true && annotation !== undefined,
      sopInstanceUID: image ? image.sopInstanceUID : null,
      frame: image ? image.frame : null,
      points,
      labels: m.labels,
      label: annotation ? annotation.data.label || null : null,
      textLines: textLines(annotation ? annotation.data.labels : m.labels),
    };
  });
  return {
    sr: request.sr,
    label: displaySet.label,
    isImagingMeasurementReport: displaySet.isImagingMeasurementReport,
    notifications,
    measurements,
  };
}

async function main() {
  await loadPackages();
  const requests = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const results = [];
  for (let i = 0; i < requests.length; i++) {
    results.push(await loadOne(requests[i], i));
  }
  const version = name => JSON.parse(fs.readFileSync(path.join(__dirname, 'node_modules', name, 'package.json'), 'utf8')).version;
  const versions = {};
  for (const name of ['@ohif/extension-cornerstone-dicom-sr', '@ohif/core', '@cornerstonejs/adapters', 'dcmjs']) {
    versions[name] = version(name);
  }
  process.stdout.write(JSON.stringify({ versions, results }));
}

// Unhandled rejections inside OHIF's code (its viewport helpers) must not pass unnoticed.
process.on('unhandledRejection', error => {
  process.stderr.write(`unhandled rejection: ${error && error.stack ? error.stack : error}\n`);
  process.exitCode = 2;
});

main().catch(error => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
