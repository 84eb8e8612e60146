// The stock Neuroglancer viewer, as Neuroglancer's own examples set it up; the state (the
// layer's source) comes from the page's URL fragment, as on any Neuroglancer page.
import "neuroglancer";
import { setupDefaultViewer } from "neuroglancer/unstable/ui/default_viewer_setup.js";

setupDefaultViewer();
